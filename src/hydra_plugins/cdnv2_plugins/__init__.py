"""cdnv2's Hydra plugins (Hydra loads plugin classes only from the hydra_plugins package).

The logic lives in cdnv2.cli; these modules only bind it to the optional plugins
(hydra-submitit-launcher, hydra-optuna-sweeper) when they are installed.
"""
