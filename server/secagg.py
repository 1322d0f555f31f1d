"""One round's secure sum through Flower's SecAgg+ workflow (Bell et al., CCS 2020).

In Flower 1.41 SecAgg+ exists only in the legacy stack: `SecAggPlusWorkflow` runs on a
`LegacyContext` whose legacy Strategy picks the clients and receives the result. fedrec
keeps its own round loop, so each round builds that context for just the cohort's devices
and reads the aggregate back. SecAgg+ returns a weighted mean; every user weighs 1, so
mean × reporting users is the sum of their clipped updates, which is all the server sees.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedrec.aggregate import UpdateSum
from fedrec.config import FedRecConfig


class _CohortFit(LegacyStrategy):
    """The legacy Strategy the workflow asks: it fits exactly the given (node, FitIns) pairs."""

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs
        self.results: list = []
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.pairs

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_sum(
    grid: Grid,
    context: Context,
    cfg: FedRecConfig,
    state: dict[str, torch.Tensor],
    routes: list[tuple[int, int]],
    task: dict,
    run_config: dict,
    update_keys: list[str],
) -> tuple[UpdateSum, int]:
    """Σ clip(Δ_u) over the devices in `routes` ((node, user) pairs); also the number that failed.

    `update_keys` are the tensors users train and send (not frozen or device-local factors).

    Updates are quantized into [-C, C] (every coordinate of a clipped update lies there),
    so the sum is exact up to 2C/2²² per coordinate and user.
    """
    keys = list(state)
    params = ndarrays_to_parameters([state[k].numpy() for k in keys])
    pairs = []
    for node, user in routes:
        config = {
            "adapter-keys": json.dumps(keys),
            "update-keys": json.dumps(update_keys),
            "task": json.dumps(task | {"user-ids": [int(user)]}),
            "run-config": json.dumps(run_config),
        }
        pairs.append((GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id), FitIns(params, config)))
    strategy = _CohortFit(pairs)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(task["round"])})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    workflow = SecAggPlusWorkflow(
        num_shares=cfg.secagg_shares,
        reconstruction_threshold=cfg.secagg_threshold,
        max_weight=1.0,
        clipping_range=float(task["clipping-norm"]),
    )
    workflow(grid, legacy)
    n = len(strategy.results)
    if n == 0:
        return UpdateSum(), len(routes)
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    delta = {k: torch.from_numpy(np.asarray(m, dtype=np.float32) * n) for k, m in zip(update_keys, mean, strict=True)}
    # Per-user loss and norm never leave the devices under SecAgg+: reported as NaN.
    return UpdateSum(delta, num_users=n, weight=float(n), loss_sum=math.nan, norm_sum=math.nan,
                     sq_norm_sum=math.nan, sq_weight_sum=math.nan), len(routes) - n
