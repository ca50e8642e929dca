// HiPPO-LegS (Gu et al. 2020) and its diagonal approximation, S4D-LegS (Gu et al. 2022, sec. 4).
// LegS: A_nk = -sqrt((2n+1)(2k+1)) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1). It is
// normal plus low rank, A = A_N - P P^T with P_n = sqrt(n + 1/2), and A_N = -1/2 I + S with S
// skew-symmetric. S4D-LegS keeps A_N's eigenvalues (-1/2 + i w) and B in A_N's eigenbasis,
// V^* B, and drops the low-rank term.
#pragma once
#include <cstdint>
#include <vector>

namespace linmix::hippo {

// The LegS matrices of size n (row-major n x n, and n).
std::vector<double> legs_A(int64_t n);
std::vector<double> legs_B(int64_t n);

// S4D-LegS for a complex state of size N: the N eigenvalues of A_N (of size 2N) with positive
// imaginary part (real parts are -1/2), ascending in w, and Bt = V^* B for their eigenvectors.
struct DiagonalLegs {
  std::vector<double> w;           // imaginary parts (N)
  std::vector<double> B_re, B_im;  // V^* B (N)
};
DiagonalLegs diagonal_legs(int64_t N);

}  // namespace linmix::hippo
