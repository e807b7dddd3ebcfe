"""Samplers as diffusers schedulers: EDM's stochastic Heun, PCG's predictor-corrector, CFG++ and LML."""
