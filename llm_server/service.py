"""The LanguageService: conversation in, vision pool for the images, vLLM for the tokens, deltas out."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry import trace
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMClientError
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from dvd.errors import ServiceError
from dvd.logs import request_context
from dvd.tracing import incoming_context, outgoing_metadata, tracer
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2
from llm_server.answer import Answer, ToolOptions, parser_class, token_logprobs
from llm_server.embedding_cache import EmbeddingCache
from llm_server.fetch import EmbeddingFetcher
from llm_server.metrics import Metrics
from llm_server.prompt import expand_videos, render_prompt
from llm_server.request import (
    chat_template_kwargs,
    check_constraints,
    check_tool_choice,
    parse_messages,
    parse_request,
    template_tools,
)
from llm_server.vir_pressure import VirPressure
from llm_server.vision_pool import VisionPool

log = logging.getLogger("llm_server.service")
# The outcome label of a refused request (dvd_llm_requests_total{status}); other codes: the code's name.
OUTCOMES = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.RESOURCE_EXHAUSTED: "vision_busy",
            grpc.StatusCode.FAILED_PRECONDITION: "vision_unavailable"}


def refusal(e: Exception) -> ServiceError | None:
    """What a Generate call that failed with `e` answers (None: a fault of this server's own, raised on)."""
    if isinstance(e, ServiceError):
        return e
    if isinstance(e, grpc.aio.AioRpcError):  # a vision call that was cancelled or ran out of time
        return ServiceError(e.details() or "vision call failed", e.code())
    if isinstance(e, EngineDeadError):  # the router tries another replica; health says NOT_SERVING
        return ServiceError("the language engine is not running", grpc.StatusCode.UNAVAILABLE)
    if isinstance(e, (ValueError, VLLMClientError)):  # vLLM's own input validation
        return ServiceError(str(e), param=getattr(e, "parameter", None))
    return None


class LanguageService(llm_pb2_grpc.LanguageServiceServicer):
    def __init__(self, engine: AsyncLLM, pool: VisionPool, model_name: str, vision_parameters: int = -1,
                 cache: EmbeddingCache | None = None, tools: ToolOptions | None = None,
                 aliases: Sequence[str] = (), vir_pressure: VirPressure | None = None) -> None:
        self.engine = engine
        self.pool = pool
        self.cache = cache if cache is not None else EmbeddingCache(0, model_name)
        self.model_name = model_name
        self.model_names = [model_name, *aliases]
        self.metrics = Metrics(model_name)
        self.vision_parameters = vision_parameters
        self.tokenizer = engine.get_tokenizer()
        self.model_config = engine.model_config
        self.max_model_len = self.model_config.max_model_len
        self.default_sampling = self.model_config.get_diff_sampling_param()
        # vLLM's chat server's cap on every request's max_tokens (a generation config's, or an override's).
        self.override_max_tokens = (self.default_sampling.get("max_tokens")
                                    if self.model_config.generation_config not in ("auto", "vllm") else
                                    getattr(self.model_config, "override_generation_config", {}).get("max_new_tokens"))
        # Flash checkpoints decide ViR per request: an image's rows then depend on the images beside it.
        self.request_wide_vir = bool(getattr(self.model_config.hf_config, "flash_mode", False))
        self.fetcher = EmbeddingFetcher(pool, self.cache, self.metrics, self.model_config.dtype,
                                        self.request_wide_vir)
        # vLLM's --reasoning-parser (an engine option, so it arrives with the others) and tool options.
        self.tools = tools or ToolOptions()
        self.parser_cls = parser_class(engine.vllm_config.structured_outputs_config.reasoning_parser,
                                       self.tokenizer, self.model_config.model, self.tools)
        self.ready = True  # off while draining: new calls are refused UNAVAILABLE, which the router retries elsewhere
        self.inflight = 0  # Generate calls in progress: a drain waits for them
        self.first_token_pending = 0  # ... of which still before their first token
        self.vir_pressure = vir_pressure or VirPressure(0)
        self.metrics.vir_pressure.set_function(lambda: self.vir_pressure.level_at(time.monotonic()))
        self.metrics.first_token_pending.set_function(lambda: self.first_token_pending)
        self.metrics.vision_servers_ready.set_function(lambda: self.pool.ready_count)

    def _logprobs(self, token_ids: Sequence[int], steps: Sequence[dict[int, Logprob] | None] | None,
                  top: int | None) -> list[llm_pb2.TokenLogprob]:
        return token_logprobs(token_ids, steps, top, lambda t: self.tokenizer.decode([t]))

    async def Metadata(self, request: vision_pb2.MetadataRequest, context) -> llm_pb2.LanguageMetadata:
        return llm_pb2.LanguageMetadata(model=self.model_name, max_model_len=self.max_model_len,
                                        vision_parameters=self.vision_parameters, model_names=self.model_names,
                                        model_root=self.model_config.model)

    def load(self) -> float:
        """What the routers balance by (the health reply's `dvd-load`): requests running in vLLM."""
        return float(self.engine.get_num_unfinished_requests())

    async def Generate(self, request: llm_pb2.GenerateRequest, context) -> AsyncIterator[llm_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        request_context(request_id)
        with tracer.start_as_current_span("llm.generate", context=incoming_context(context.invocation_metadata()),
                                          kind=trace.SpanKind.SERVER, attributes={"dvd.request_id": request_id,
                                                                                  "gen_ai.request.model":
                                                                                  self.model_name}):
            async for response in self._serve(request_id, request, context):
                yield response

    async def _serve(self, request_id: str, request: llm_pb2.GenerateRequest,
                     context) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Generate's outcomes: each failure aborts the call with its status, once, here, and is counted."""
        self.inflight += 1
        self.metrics.inflight.inc()
        status = "error"
        self.first_token_pending += 1
        pending = True
        try:
            if not self.ready:
                raise ServiceError("language server is stopping", grpc.StatusCode.UNAVAILABLE)
            if self.engine.errored:
                raise EngineDeadError()
            async for response in self._generate(request_id, request):
                if pending:  # the first response carries the first token
                    self._first_token_done()
                    pending = False
                yield response
            status = "ok"
        except Exception as e:
            error = refusal(e)
            if error is None:
                raise
            status = OUTCOMES.get(error.code, error.code.name.lower())
            log.info("refused", extra={"request_id": request_id, "code": error.code.name, "reason": error.message})
            await error.abort(context)
        finally:
            if pending:
                self._first_token_done()
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.request_done(status)

    def _first_token_done(self) -> None:
        """A call left the first-token queue (its first token, or its end): ViR's pressure follows every change."""
        self.first_token_pending -= 1
        self.vir_pressure.observe(self.first_token_pending)

    async def _generate(self, request_id: str,
                        request: llm_pb2.GenerateRequest) -> AsyncIterator[llm_pb2.GenerateResponse]:
        t0 = time.perf_counter()
        openai, options = parse_request(request.chat_request)
        check_tool_choice(openai, self.parser_cls, self.tools)
        template_kwargs = chat_template_kwargs(openai)
        answer = Answer(self.parser_cls, self.tokenizer, self.model_config, openai, template_kwargs, self.tools)
        answer.adjust_request()
        constraint = check_constraints(openai, self.model_config, self.engine.vllm_config.structured_outputs_config,
                                       self.tokenizer)
        conversation = parse_messages(openai.messages, list(request.media))
        prompt = render_prompt(self.tokenizer, conversation, self.model_config, template_kwargs,
                               template_tools(openai, self.tools))
        if self.request_wide_vir and options.vir != vision_pb2.VIR_MODE_OFF:
            options.vir_pressure = self.vir_pressure.observe(self.first_token_pending)
        fetched = await self.fetcher.fetch(request_id, conversation, options)
        t_vision = time.perf_counter()
        embeddings = fetched.embeddings
        prompt = expand_videos(prompt, fetched.frames)
        inputs: dict = {"prompt": prompt}
        visual_tokens = sum(e.shape[0] for e in embeddings)
        if embeddings:
            inputs["multi_modal_data"] = {"image": embeddings}
            inputs["multi_modal_uuids"] = {"image": fetched.uuids}
        # The prompt is tokenised once, by vLLM's renderer as its chat server does it (placeholders expanded to the
        # embeddings' rows); the engine takes the rendered input as it is, and its length sizes max_tokens.
        (engine_input,) = await self.engine.renderer.render_cmpl_async([inputs], openai.build_tok_params(
            self.model_config))
        prompt_ids: list[int] = engine_input["prompt_token_ids"]
        prompt_tokens = len(prompt_ids)
        if prompt_tokens >= self.max_model_len:
            raise ServiceError(f"the prompt has {prompt_tokens} tokens ({visual_tokens} of them visual), more than the "
                               f"model's context of {self.max_model_len} tokens")
        # vLLM's chat server's rules: max_tokens within the context and the caps, then its request's own mapping.
        max_tokens = get_max_tokens(self.max_model_len, openai.max_completion_tokens if openai.max_completion_tokens
                                    is not None else openai.max_tokens, prompt_tokens, self.default_sampling,
                                    self.override_max_tokens)
        params = openai.to_sampling_params(max_tokens, self.default_sampling)
        params.output_kind = RequestOutputKind.DELTA  # whole answers too: Answer assembles them
        params.structured_outputs = constraint
        self.metrics.visual_tokens.inc(visual_tokens)  # counted once the request is accepted

        # As vLLM's server tells the engine where the reasoning ends (structured outputs start after it).
        reasoning = {"reasoning_ended": openai.resolve_reasoning_ended(answer.choices[0].parser, prompt_ids),
                     "reasoning_parser_kwargs": {"chat_template_kwargs": template_kwargs}
                     if answer.parses_reasoning else None}

        def logprobs(token_ids: Sequence[int], steps) -> list[llm_pb2.TokenLogprob]:
            return self._logprobs(token_ids, steps, params.logprobs)

        completion_tokens = 0
        cached = 0
        first_token_at: float | None = None
        engine_span = tracer.start_span("llm.engine", attributes={"gen_ai.usage.input_tokens": prompt_tokens,
                                                                  "dvd.visual_tokens": visual_tokens})
        # vLLM's own spans (--otlp-traces-endpoint: queue, prefill and decode times) join this trace under it.
        with trace.use_span(engine_span):  # only when vLLM traces too (else it warns on every request)
            trace_headers = dict(outgoing_metadata()) if self.engine.observability_config.otlp_traces_endpoint \
                else None
        try:
            async for out in self.engine.generate(engine_input, params, request_id, trace_headers=trace_headers,
                                                  **reasoning):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    engine_span.add_event("first_token")
                cached = out.num_cached_tokens or cached
                completion_tokens += sum(len(o.token_ids) for o in out.outputs)
                yield llm_pb2.GenerateResponse(choices=answer.deltas(out, logprobs))
        finally:
            engine_span.set_attributes({"gen_ai.usage.output_tokens": completion_tokens,
                                        "dvd.cached_tokens": cached})
            engine_span.end()
        t_end = time.perf_counter()
        timings = llm_pb2.StageTimings(vision_seconds=t_vision - t0,
                                       queue_seconds=(first_token_at or t_end) - t_vision,
                                       embedding_bytes=fetched.bytes_received,
                                       vision_preprocess_seconds=fetched.summary.preprocess_seconds,
                                       vision_queue_seconds=fetched.summary.queue_seconds,
                                       vision_compute_seconds=fetched.summary.compute_seconds,
                                       decode_seconds=t_end - (first_token_at or t_end))
        log.info("request done", extra={"request_id": request_id, "images": len(embeddings),
                                        "visual_tokens": visual_tokens, "prompt_tokens": prompt_tokens,
                                        "completion_tokens": completion_tokens, "cached_tokens": cached,
                                        "vision_s": round(t_vision - t0, 4),
                                        "first_token_s": round((first_token_at or t_end) - t_vision, 4),
                                        "total_s": round(t_end - t0, 4)})
        yield llm_pb2.GenerateResponse(
            usage=llm_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                visual_tokens=visual_tokens, cached_prompt_tokens=cached,
                                reasoning_tokens=answer.reasoning_tokens()),
            timings=timings,
        )
