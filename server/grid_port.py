"""The run's port over Flower's Grid: route a cohort to nodes, sum their replies.

`GridPort` implements `fedrec.port.RoundPort`: `train(round, cohort, adapter, clip)` and
`evaluate(round, users, adapter, split)`. The run object draws the cohort and makes the
server step; this class only knows nodes, messages, failures and SecAgg+.

A plain class over the Grid, not a `flwr.serverapp.strategy.Strategy`: a Strategy's loop
(`start`) samples nodes and steps the model itself, and its aggregation expects one
ArrayRecord plus `num-examples` per reply; here the run samples users (seeded) and steps,
this class routes the users to nodes, and each reply is already a sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrec import interrupt
from fedrec.aggregate import UpdateSum
from fedrec.local_state import keeps_client_state
from fedrec.privacy.clipping import reply_fault
from fedrec.cohort import assign_silos, split_among
from fedrec.config import FedRecConfig
from fedrec.metrics import add_sums, metric_means
from fedrec.model.types import AdapterState
from fedrec.port import EvalResult, TrainResult
from fedrec.workload import ItemSide
from server.stoppable_grid import StoppableGrid
from server.traffic import CountingGrid

NODE_WAIT_S = 120.0
RESEND_ATTEMPTS = 4  # re-sends of a failed cohort worker's messages within one round
RESEND_WAIT_S = 2.0  # times the attempt number, before each re-send after the first
PULL_INTERVAL_S = 0.005
DEVICE_SETTLE_S = 15.0


@dataclass
class BaseShipment:
    """What a real device receives once before round 1: the frozen base and the catalogue."""

    fingerprint: str  # names the base (its cache file's stem); devices keep it under this name
    path: Path
    item_ids: list[str]
    user_ids: list[str]  # raw user id of every user index, to resolve a device's `user-id`
    item_side: ItemSide | None = None  # the item adapter's public inputs (row set, item features)


class GridPort:
    def __init__(
        self,
        cfg: FedRecConfig,
        population: np.ndarray,
        base: BaseShipment | None = None,
        log: Callable[[str], None] = print,
        context: Context | None = None,
        update_keys: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.context = context  # the ServerApp's; SecAgg+ builds its legacy context from it
        self.update_keys = update_keys or []  # what users send: SecAgg+ needs the vector's layout
        self.base = base
        self.log = log
        self.silos = assign_silos(population, cfg.num_silos, cfg.seed) if cfg.partition == "silo" else []
        self.population = np.asarray(population, dtype=np.int64)
        self.workers: list[int] = []
        self.worker_places: dict[str, str] = {}  # every process that trained → its Ray node ("" outside Ray)
        self.user_node: dict[int, int] = {}
        self.failed_users: list[int] = []  # device placement: users whose device failed the last exchange
        self._run_config = ConfigRecord(cfg.to_dict())  # resolved once; travels with every message
        self.setup_traffic: dict[str, float] = {}  # bytes of the messages `connect` exchanged
        # noise-placement=devices under SecAgg+: the plan the devices encode with (set by the run)
        self.noise_plan = None

    # ------------------------------------------------------------ node routing
    def connect(self, grid: Grid, timeout: float = NODE_WAIT_S) -> None:
        """Wait for the nodes this placement needs; in device placement, learn who holds whom.

        Real devices (node config `data-path`) get the base model and catalogue if they lack
        them and check their own data; a device that cannot is reported and left out, and
        the population becomes the users whose devices answered.
        """
        grid = StoppableGrid(grid, stoppable=not keeps_client_state(self.cfg))
        if hasattr(grid, "pull_interval"):
            # The simulation's in-memory grid polls for replies every 0.1 s by default
            # (a constructor argument we cannot reach through run_simulation); a vectorized
            # round is short enough that this idle wait is a large share of it
            # (experiments/README.md#throughput-what-moved).
            grid.pull_interval = PULL_INTERVAL_S
        self._plain_grid = grid  # evaluation's messages: a simulation's diagnostic, not training traffic
        grid = self._grid = CountingGrid(grid)  # every other message goes through it from now on, counted
        device = self.cfg.placement == "device"
        enroll = self.cfg.private_users == "enrolled"
        need = (self.cfg.enroll_devices or 2**31) if enroll else len(self.population) if device else self.cfg.num_workers
        deadline = time.monotonic() + timeout
        seen, last_change = 0, time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) != seen:
                seen, last_change = len(nodes), time.monotonic()
            if len(nodes) >= need:
                break
            # Devices come and go: once none has joined for a while, go on with those present.
            settled = nodes and time.monotonic() - last_change > DEVICE_SETTLE_S
            if not device and settled:  # a simulation's SuperNodes all register at its start: no more will come
                raise RuntimeError(
                    f"only {len(nodes)} SuperNodes for num-workers={need}, and none joined for {DEVICE_SETTLE_S:.0f} s; "
                    f"under `flwr run` the federation sets how many (`flwr federation simulation-config "
                    f"--num-supernodes {need}`), or lower num-workers"
                )  # fmt: skip
            if (device and settled) or time.monotonic() > deadline:
                if enroll and nodes:
                    self.log(f"{len(nodes)} device nodes connected, none for {DEVICE_SETTLE_S:.0f} s: they enroll")
                    break
                if device and nodes:
                    self.log(f"{len(nodes)} of {need} device nodes connected; going on with them (a device that "
                             "could not join says why in its own log; server.local_federation reports it)")
                    break
                raise RuntimeError(f"only {len(nodes)} of {need} SuperNodes connected after {timeout:.0f} s")
            if interrupt.wait(0.2):
                interrupt.check("while waiting for SuperNodes")
        if not device:
            nodes = nodes[:need]
        # The query also warms each node (data, base model, torch) before round 1.
        replies = self._receive(grid, [self._query(n, "identify") for n in nodes], "identify", tolerate=device)
        if not device:
            self.workers = nodes
            self.setup_traffic = grid.take()
            return
        to_setup: list[tuple[int, int, bool]] = []  # (node, user, needs the base)
        user_index = {self.base.user_ids[int(u)]: int(u) for u in self.population} if self.base else {}
        if enroll:
            replies = self._enroll(replies)
        for reply in replies:
            identity = reply.content["identity"]
            node = reply.metadata.src_node_id
            if "enrolled" in identity:  # a device that enrolled: the index `_enroll` gave it
                to_setup.append((node, int(identity["enrolled"]), bool(identity["needs-base"])))
            elif "user-key" in identity:  # a real device: resolve its user id, then set it up
                key = str(identity["user-key"])
                if key not in user_index:
                    self.log(f"device node {node}: user {key!r} is not a private user of this run; left out")
                    continue
                to_setup.append((node, user_index[key], bool(identity["needs-base"])))
            elif int(identity["user-id"]) >= 0:
                self.user_node[int(identity["user-id"])] = node
        if to_setup:
            self._setup_devices(grid, to_setup)
        missing = [int(u) for u in self.population if int(u) not in self.user_node]
        if missing:
            self.log(f"{len(missing)} of {len(self.population)} private users have no working device; left out")
            self.population = np.array(sorted(self.user_node), dtype=np.int64)
        if not len(self.population):
            raise RuntimeError("no device node can train: see the messages above")
        self.setup_traffic = grid.take()  # identify, and the base and catalogue where shipped

    def _enroll(self, replies: list[Message]) -> list[Message]:
        """private-users=enrolled: every device that answered with an opaque key becomes a
        private user, numbered after the server's own (public) users in the order of the keys,
        so that the same devices get the same numbers (and the run's seeds) in every run."""
        keyed = sorted((str(r.content["identity"]["device-key"]), r) for r in replies
                       if "device-key" in r.content["identity"])  # fmt: skip
        if len(keyed) < len(replies):
            self.log(f"{len(replies) - len(keyed)} node(s) answered without a device key (not real devices); left out")
        first = len(self.base.user_ids) if self.base else 0
        for k, (_key, reply) in enumerate(keyed):
            reply.content["identity"]["enrolled"] = first + k
        self.population = np.arange(first, first + len(keyed), dtype=np.int64)
        self.log(f"enrollment: {len(keyed)} devices enrolled; the private population is N={len(keyed)} "
                 "(one device per user assumed: a user with two devices counts twice)")  # fmt: skip
        return [r for _k, r in keyed]

    def _query(self, node: int, kind: str, user: int | None = None, shipment: dict | None = None) -> Message:
        task = {"kind": kind, "base": self.base.fingerprint if self.base else ""}
        if kind == "identify" and self.cfg.private_users == "enrolled":
            task["enroll"] = 1
        if user is not None:
            task["user-ids"] = [user]
        content = RecordDict({"task": ConfigRecord(task), "run-config": self._run_config} | (shipment or {}))
        return Message(content, dst_node_id=node, message_type=MessageType.QUERY)

    def _setup_devices(self, grid: Grid, to_setup: list[tuple[int, int, bool]]) -> None:
        shipment = {}
        if self.base is not None and any(ship for _n, _u, ship in to_setup):
            shipment = {
                "base": ArrayRecord(torch.load(self.base.path, map_location="cpu", weights_only=True)),
                "catalogue": ConfigRecord({"item-ids": self.base.item_ids}),
            }
        # The item adapter's public inputs go to every device: they depend on the run, not the base.
        side = self.base.item_side.to_record() if self.base is not None and self.base.item_side is not None else {}
        items = {"item-side": ConfigRecord(side)} if side else {}
        msgs = [self._query(node, "setup", user, (shipment if ship else {}) | items) for node, user, ship in to_setup]
        shipped = sum(ship for _n, _u, ship in to_setup)
        self.log(f"devices: {len(to_setup)} real devices; base model and catalogue sent to {shipped}")
        by_node = {node: user for node, user, _ship in to_setup}
        for reply in self._receive(grid, msgs, "setup", tolerate=True):
            counts = reply.content["counts"]
            if counts["unknown-items"]:
                self.log(f"device node {reply.metadata.src_node_id}: {int(counts['unknown-items'])} interactions "
                         "with items outside the catalogue are not used")  # fmt: skip
            self.user_node[by_node[reply.metadata.src_node_id]] = reply.metadata.src_node_id

    def _messages(self, arrays: ArrayRecord, users: np.ndarray, task: dict, message_type: str) -> list[Message]:
        """One message per (node, share of users); silos train as units, one message each."""
        task = task | {"base": self.base.fingerprint if self.base else ""}
        if self.cfg.placement == "device":
            shares = [(self.user_node[int(u)], np.array([u]), {}) for u in users]
        elif self.silos and message_type == MessageType.TRAIN:  # round-robin silos over the workers
            shares = [(self.workers[s % len(self.workers)], share, {"silo": s}) for s, share in enumerate(self.silos)]
        else:
            shares = [(n, share, {}) for n, share in zip(self.workers, split_among(users, len(self.workers)))]
        msgs = []
        for node, share, extra in shares:
            content = RecordDict(
                {
                    "adapter": arrays,
                    "task": ConfigRecord({**task, **extra, "user-ids": [int(u) for u in share]}),
                    "run-config": self._run_config,
                }
            )
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        return msgs

    def _receive(self, grid: Grid, msgs: list[Message], what: str, tolerate: bool = False) -> list[Message]:
        """Replies without errors, in the order of `msgs`. With `tolerate` (devices), a failed
        node is reported and its users are recorded in `failed_users`; otherwise the messages
        of a failed worker go to the live workers (`_resend`)."""
        replies = list(grid.send_and_receive(msgs, timeout=3600))
        # Replies arrive in any order; put back in the order their messages were built (by user),
        # a round's floats add up the same way every time and a run repeats to the bit.
        index = {m.metadata.message_id: i for i, m in enumerate(msgs)}
        by_msg = {index[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in index}
        lost = [i for i in range(len(msgs)) if i not in by_msg or by_msg[i].has_error()]
        self.failed_users = []
        if lost and not tolerate:
            by_msg |= self._resend(grid, msgs, lost, by_msg, what)
        for i in lost if tolerate else []:
            why = by_msg[i].error.reason if i in by_msg else "no reply"
            self.log(f"{what}: node {msgs[i].metadata.dst_node_id} failed and is left out: {why}")
            self.failed_users += [int(u) for u in msgs[i].content["task"].get("user-ids", [])]
        return [by_msg[i] for i in sorted(by_msg) if not by_msg[i].has_error()]

    def _resend(self, grid: Grid, msgs: list[Message], lost: list[int], by_msg: dict[int, Message],
                what: str, attempt: int = 1) -> dict[int, Message]:  # fmt: skip
        """A failed cohort worker's messages, sent again within the round to the workers still in
        the federation (the failed one last: a simulated worker is restarted by Ray, a real one
        may be gone). Users train from their own seeds, so the sum is what it would have been,
        its float order aside. After RESEND_ATTEMPTS the run stops."""
        why = next((by_msg[i].error.reason for i in lost if i in by_msg), "no reply")
        dead = {msgs[i].metadata.dst_node_id for i in lost}
        present = set(grid.get_node_ids())
        self.workers = [n for n in self.workers if n in present]
        live = [n for n in self.workers if n not in dead] or self.workers
        if self.cfg.placement != "cohort" or not live or attempt > RESEND_ATTEMPTS:
            raise RuntimeError(f"{what}: {len(lost)} of {len(msgs)} nodes failed; node {min(dead)}: {why}")
        self.log(f"{what}: worker node(s) {', '.join(map(str, sorted(dead)))} failed ({why.splitlines()[0][:160]}); "
                 f"their users go to {len(live)} worker(s), attempt {attempt}/{RESEND_ATTEMPTS}")  # fmt: skip
        time.sleep(RESEND_WAIT_S * (attempt - 1))  # a restarting worker needs a moment
        again = [Message(msgs[i].content, dst_node_id=live[k % len(live)], message_type=msgs[i].metadata.message_type)
                 for k, i in enumerate(lost)]  # fmt: skip
        replies = list(grid.send_and_receive(again, timeout=3600))
        index = {m.metadata.message_id: i for i, m in zip(lost, again)}
        got = {index[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in index}
        still = [i for i in lost if i not in got or got[i].has_error()]
        if still:
            got |= self._resend(grid, msgs, still, got, what, attempt + 1)
        return {i: r for i, r in got.items() if not r.has_error()}

    # ------------------------------------------------------------ the run's port
    def train(self, round_: int, cohort: np.ndarray, adapter: AdapterState, clipping_norm: float) -> TrainResult:
        """The cohort's sum of clipped updates, from worker sums, device replies or SecAgg+."""
        cohort = np.asarray(cohort, dtype=np.int64)
        arrays = ArrayRecord(adapter)
        if self.cfg.secure_aggregation == "secagg+":
            result = self._secagg_round(round_, cohort, arrays, clipping_norm)
        else:
            task = {"round": round_, "clipping-norm": float(clipping_norm)}
            msgs = self._messages(arrays, cohort, task, MessageType.TRAIN)
            replies = self._receive(self._grid, msgs, "train", tolerate=self.cfg.placement == "device")
            expected = {k: adapter[k].to(torch.float32) for k in self.update_keys} if self.update_keys else None
            result = self._sum_replies(round_, len(cohort), replies, expected, clipping_norm)
        result.diagnostics |= self._grid.take()  # bytes on the round's messages, both ways
        return result

    def evaluate(self, round_: int, users: np.ndarray, adapter: AdapterState, split: str) -> EvalResult:
        """Means over the evaluated users, and each user's rank (the run's intervals resample them)."""
        users = np.asarray(users, dtype=np.int64)
        msgs = self._messages(ArrayRecord(adapter), users, {"round": round_, "split": split}, MessageType.EVALUATE)
        replies = self._receive(self._plain_grid, msgs, f"evaluate {split}", tolerate=self.cfg.placement == "device")
        sums: dict[str, float] = {}
        ranks: dict[int, int] = {}
        for reply in replies:
            sums = add_sums(sums, {k: float(v) for k, v in reply.content["metrics"].items()})
            got = reply.content.array_records.get("ranks")
            if got is not None:
                got = got.to_torch_state_dict()
                ranks.update(zip(got["users"].tolist(), got["ranks"].tolist()))
        expected = len(users) - len(self.failed_users)
        if int(sums.get("count", 0)) != expected:
            raise RuntimeError(f"evaluation: {sums.get('count', 0):.0f} of {expected} users reported")
        return EvalResult({k: float(v) for k, v in metric_means(sums).items()}, ranks)

    def _sum_replies(self, server_round: int, sent: int, replies: Iterable[Message], expected: AdapterState | None,
                     clipping_norm: float) -> TrainResult:  # fmt: skip
        """The replies' sum; a reply that fails `reply_fault` is left out and its users counted
        as rejected (the round goes on without them)."""
        total = UpdateSum()
        silo_eps = peak_rss = peak_gpu = busiest = 0.0
        places: dict[str, str] = {}  # worker process → its Ray node
        for reply in replies:
            counts = {k: float(v) for k, v in reply.content["counts"].items()}
            if "where" in reply.content:
                where = reply.content["where"]
                places[str(where["process"])] = str(where["ray-node"])
            silo_eps = max(silo_eps, counts.get("silo-epsilon", 0.0))
            peak_rss = max(peak_rss, counts.get("peak-rss-mb", 0.0))
            peak_gpu = max(peak_gpu, counts.get("peak-gpu-mb", 0.0))
            busiest = max(busiest, counts.get("train-seconds", 0.0))
            part = UpdateSum.from_parts(reply.content["update"].to_torch_state_dict(), counts)
            fault = None
            if part.num_users > 0 and expected is not None and not self.silos:  # a silo's DP-SGD update is not clipped per user
                fault = reply_fault(part.delta, part.weight, expected, clipping_norm)
            if fault:
                self.log(f"round {server_round}: node {reply.metadata.src_node_id}'s update rejected ({fault}); "
                         f"its {part.num_users} user(s) left out")  # fmt: skip
                total.merge(UpdateSum(rejected=part.rejected | {fault: part.num_users}))
            else:
                total.merge(part)
        reported = sent - len(self.failed_users)
        accounted = total.num_users + total.num_rejected + total.num_dropped
        if accounted != reported:
            raise RuntimeError(f"round {server_round}: {accounted} of {reported} cohort users accounted for")
        diagnostics = {
            "worker-peak-rss-mb": peak_rss,  # the largest of the replying nodes' peak memory
            "worker-train-seconds": busiest,  # the slowest node's time inside its train handler
            "worker-processes": len(places),  # distinct processes that trained this round
            "worker-ray-nodes": len(set(places.values()) - {""}),  # and the Ray nodes they ran on
        }
        self.worker_places.update(places)
        if peak_gpu:
            diagnostics["worker-peak-gpu-mb"] = peak_gpu  # the largest of the nodes' peak CUDA memory (torch's allocator)
        if self.silos:
            diagnostics["silo-epsilon"] = silo_eps  # the largest of the silos' sample-level ε
        return TrainResult(total, diagnostics)

    def _secagg_round(self, server_round: int, cohort: np.ndarray, arrays: ArrayRecord, clipping_norm: float) -> TrainResult:
        """The cohort's sum through SecAgg+: the server never holds one user's update."""
        from server.secagg import secure_sum  # the legacy Flower stack, loaded only when asked

        if self.context is None or not self.update_keys:
            raise RuntimeError("secure-aggregation=secagg+ needs the ServerApp context and the update's keys")
        task = {"round": server_round, "clipping-norm": float(clipping_norm),
                "base": self.base.fingerprint if self.base else ""}  # fmt: skip
        routes = [(self.user_node[int(u)], int(u)) for u in cohort]
        if self.cfg.noise_placement == "devices":
            if self.noise_plan is None:
                raise RuntimeError("noise-placement=devices: the run gave the port no noise plan")
            task["noise-plan"] = self.noise_plan.to_record()
        total, failed = secure_sum(self._grid, self.context, self.cfg, arrays.to_torch_state_dict(), routes, task,
                                   self.cfg.to_dict(), self.update_keys, plan=self.noise_plan)  # fmt: skip
        if failed:
            self.log(f"round {server_round}: {failed} of {len(routes)} devices dropped out of SecAgg+")
        return TrainResult(total)

