// HiPPO-LegS and S4D-LegS (see hippo.h). The eigenproblem is LAPACK's (zheev, from OpenBLAS) on
// the Hermitian i S: i S v = l v gives S v = -i l v, so A_N's eigenvalue is -1/2 - i l.
#include "linmix/hippo.h"

#include <cmath>
#include <complex>

#include "linmix/error.h"

extern "C" void zheev_(const char* jobz, const char* uplo, const int* n, std::complex<double>* a, const int* lda,
                       double* w, std::complex<double>* work, const int* lwork, double* rwork, int* info, size_t,
                       size_t);

namespace linmix::hippo {

std::vector<double> legs_A(int64_t n) {
  std::vector<double> A(size_t(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k <= i; ++k)
      A[size_t(i * n + k)] = i > k ? -std::sqrt(double((2 * i + 1) * (2 * k + 1))) : -double(i + 1);
  return A;
}

std::vector<double> legs_B(int64_t n) {
  std::vector<double> B(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) B[size_t(i)] = std::sqrt(double(2 * i + 1));
  return B;
}

DiagonalLegs diagonal_legs(int64_t N) {
  LINMIX_CHECK(N >= 1 && N <= 1024, "hippo: state size must be in [1, 1024]");
  const int n = int(2 * N);
  const std::vector<double> A = legs_A(n), B = legs_B(n);
  // H = i S, S = A + P P^T + I/2 (its skew part), column-major for LAPACK (H is Hermitian)
  std::vector<std::complex<double>> H(size_t(n) * size_t(n));
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < n; ++k) {
      const double s = A[size_t(i * n + k)] + std::sqrt((i + 0.5) * (k + 0.5)) + (i == k ? 0.5 : 0.0);
      H[size_t(k) * size_t(n) + size_t(i)] = std::complex<double>(0.0, s);
    }
  std::vector<double> l(static_cast<size_t>(n)), rwork(static_cast<size_t>(3 * n));
  int lwork = -1, info = 0;
  std::complex<double> q;
  zheev_("V", "U", &n, H.data(), &n, l.data(), &q, &lwork, rwork.data(), &info, 1, 1);
  lwork = int(q.real());
  std::vector<std::complex<double>> work(size_t(std::max(lwork, 1)));
  zheev_("V", "U", &n, H.data(), &n, l.data(), work.data(), &lwork, rwork.data(), &info, 1, 1);
  LINMIX_CHECK(info == 0, "hippo: LAPACK zheev failed (info " + std::to_string(info) + ")");
  // ascending l: the first N are negative, i.e. eigenvalues -1/2 + i w with w = -l > 0
  DiagonalLegs d;
  for (int j = N - 1; j >= 0; --j) {
    d.w.push_back(-l[size_t(j)]);
    std::complex<double> b = 0;
    for (int i = 0; i < n; ++i) b += std::conj(H[size_t(j) * size_t(n) + size_t(i)]) * B[size_t(i)];
    d.B_re.push_back(b.real());
    d.B_im.push_back(b.imag());
  }
  return d;
}

}  // namespace linmix::hippo
