"""hydra/sweeper=pareto (see cdnv2.cli.search); needs cdnv2[search]."""
import importlib.util

if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    from cdnv2.cli.search import ParetoSearch

    class ParetoSweeper(ParetoSearch, OptunaSweeper):
        """Multi-objective Optuna search; writes the Pareto front (table and PNG)."""
