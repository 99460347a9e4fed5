"""Models: factor priors, kernels, likelihoods and the PNMF estimator."""
