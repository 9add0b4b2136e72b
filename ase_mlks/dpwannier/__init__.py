"""DPWannier: Deep-Potential force field + equivariant Wannier Hamiltonian (paper 002)."""
