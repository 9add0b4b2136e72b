"""Orbital-free DFT by energy minimization in the latent space of a density VAE.

Costa, Scriva & Pilati, "Solving deep-learning density functional theory via variational
autoencoders".  ``solve(potential, model)`` for the three testbeds ('gauss1d',
'speckle1d', 'gauss3d'); ``OFDFTCalc`` is the ASE calculator of the 3D scatterer model.
"""

from .calculator import OFDFTCalc
from .data import TESTBEDS, get_testbed, ground_state
from .model import DensityVAE, FunctionalCNN, OFDFTModel
from .solver import OFDFTResult, solve

__all__ = ["OFDFTCalc", "solve", "OFDFTResult", "OFDFTModel", "DensityVAE", "FunctionalCNN",
           "TESTBEDS", "get_testbed", "ground_state"]
