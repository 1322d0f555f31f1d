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
from fedrec.privacy.distributed import MODULUS_BITS, TOO_FEW, SkellamPlan


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


class _GuardedSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that refuses to unmask a sum whose devices' noise falls short (distributed DP):
    with fewer than `min_survivors` masked vectors, the unmask stage never runs."""

    def __init__(self, *args, min_survivors: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_survivors = min_survivors
        self.survivors = -1  # devices whose masked vectors arrived (-1: the stage was not reached)

    def unmask_stage(self, grid, context, state) -> bool:
        self.survivors = len(state.active_node_ids)
        if self.survivors < self.min_survivors:
            return False
        return super().unmask_stage(grid, context, state)


def secure_sum(
    grid: Grid,
    context: Context,
    cfg: FedRecConfig,
    state: dict[str, torch.Tensor],
    routes: list[tuple[int, int]],
    task: dict,
    run_config: dict,
    update_keys: list[str],
    plan: SkellamPlan | None = None,
) -> tuple[UpdateSum, int]:
    """Σ clip(Δ_u) over the devices in `routes` ((node, user) pairs); also the number that failed.

    `update_keys` are the tensors users train and send (not frozen or device-local factors).

    Updates are quantized into [-C, C] (every coordinate of a clipped update lies there),
    so the sum is exact up to 2C/2²² per coordinate and user.

    With a distributed-DP `plan` the devices hand SecAgg+ integers in [0, T) already noised
    (`SkellamPlan.encode`, shifted into [−T/2, T/2) so that SecAgg+'s quantization maps them
    onto themselves); the result is their sum in the field, `encoded` for the mechanism to
    decode. Fewer than `plan.min_survivors` masked vectors: nothing is unmasked.
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
    field = {} if plan is None else {"clipping_range": plan.field / 2, "quantization_range": plan.field,
                                     "modulus_range": 2**MODULUS_BITS}  # fmt: skip
    workflow = _GuardedSecAggPlus(
        num_shares=cfg.secagg_shares,
        reconstruction_threshold=cfg.secagg_threshold,
        max_weight=1.0,
        **({"clipping_range": float(task["clipping-norm"])} | field),
        min_survivors=plan.min_survivors if plan is not None else 0,
    )
    workflow(grid, legacy)
    n = len(strategy.results)
    if plan is not None and 0 <= workflow.survivors < plan.min_survivors:  # refused before unmasking
        return UpdateSum(rejected={TOO_FEW: workflow.survivors}, encoded=True), len(routes) - workflow.survivors
    if n == 0:
        return UpdateSum(), len(routes)
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    if plan is not None:
        # SecAgg+ returns (Σ v − n·T/2)/n for v = the devices' field values: the field sum back, in float64 (exact)
        delta = {k: torch.from_numpy(np.rint(np.asarray(m, dtype=np.float64) * n + n * plan.field / 2))
                 for k, m in zip(update_keys, mean, strict=True)}  # fmt: skip
    else:
        delta = {k: torch.from_numpy(np.asarray(m, dtype=np.float32) * n) for k, m in zip(update_keys, mean, strict=True)}
    # Per-user loss and norm never leave the devices under SecAgg+: reported as NaN.
    return UpdateSum(delta, num_users=n, weight=float(n), loss_sum=math.nan, norm_sum=math.nan,
                     sq_norm_sum=math.nan, sq_weight_sum=math.nan, encoded=plan is not None), len(routes) - n
