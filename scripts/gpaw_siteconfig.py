# GPAW build configuration for a plain Debian machine (serial, no ScaLAPACK/ELPA).
# Used by scripts/run as GPAW_CONFIG=scripts/gpaw_siteconfig.py pip install gpaw.
mpi = False
compiler = 'g++'  # GPAW's C sources compile as C++ here; gcc alone fails.
libraries = ['xc', 'openblas', 'fftw3']
fftw = True
scalapack = False
