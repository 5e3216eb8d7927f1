"""hydra/launcher=slurm and slurm_local (see cdnv2.cli.launchers); needs cdnv2[cluster]."""
import importlib.util

if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

    from cdnv2.cli.launchers import SweepPointLauncher

    class CdnSlurmLauncher(SweepPointLauncher, SlurmLauncher):
        """One torchrun-style Slurm job per sweep point."""

    class CdnLocalLauncher(SweepPointLauncher, LocalLauncher):
        """The same jobs as local processes (submitit's local executor)."""
