"""The LanguageService: conversation in, vision pool for the images, vLLM for the tokens, deltas out."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry import trace
from vllm.entrypoints.openai.chat_completion.serving import _get_mm_token_counts
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from dvd.errors import ServiceError
from dvd.logs import request_context
from dvd.tracing import incoming_context, outgoing_metadata, tracer
from dvd.v2 import llm_pb2, llm_pb2_grpc, vision_pb2
from llm_server.answer import ChatOptions, Progress, answer, chat_server
from llm_server.embedding_cache import EmbeddingCache
from llm_server.fetch import EmbeddingFetcher
from llm_server.metrics import Metrics
from llm_server.prompt import expand_videos, render_prompt
from llm_server.request import (
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
                 cache: EmbeddingCache | None = None, chat: ChatOptions | None = None,
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
        # Flash checkpoints decide ViR per request: an image's rows then depend on the images beside it.
        self.request_wide_vir = bool(getattr(self.model_config.hf_config, "flash_mode", False))
        self.fetcher = EmbeddingFetcher(pool, self.cache, self.metrics, self.model_config.dtype,
                                        self.request_wide_vir)
        # vLLM's chat server: its options, its parsers (--reasoning-parser is an engine option), its answers.
        self.options = chat or ChatOptions()
        self.chat = chat_server(engine, self.model_names,
                                engine.vllm_config.structured_outputs_config.reasoning_parser, self.options)
        self.ready = True  # off while draining: new calls are refused UNAVAILABLE, which the router retries elsewhere
        self.inflight = 0  # Generate calls in progress: a drain waits for them
        self.first_token_pending = 0  # ... of which still before their first token
        self.vir_pressure = vir_pressure or VirPressure(0)
        self.metrics.vir_pressure.set_function(lambda: self.vir_pressure.level_at(time.monotonic()))
        self.metrics.first_token_pending.set_function(lambda: self.first_token_pending)
        self.metrics.vision_servers_ready.set_function(lambda: self.pool.ready_count)

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
        check_tool_choice(openai, self.chat.parser_cls, self.options)
        # The keyword arguments vLLM gives the chat template and the parsers (add_generation_prompt and the rest),
        # by vLLM's own rule: the ones its generators use for every further choice.
        template_kwargs = self.chat._effective_chat_template_kwargs(openai)
        # As vLLM's chat server: one parser for the request (the tool parser's constraint for tool_choice
        # required/named goes on the request), one per choice again inside its response generators.
        parser = self.chat._make_parser(openai, self.tokenizer, template_kwargs) if self.chat.parser_cls else None
        if parser is not None:
            parser.adjust_request(openai)
        constraint = check_constraints(openai, self.model_config, self.engine.vllm_config.structured_outputs_config,
                                       self.tokenizer)
        conversation = parse_messages(openai.messages, list(request.media))
        prompt = render_prompt(self.tokenizer, conversation, self.model_config, template_kwargs,
                               template_tools(openai, self.options))
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
                                    is not None else openai.max_tokens, prompt_tokens,
                                    self.chat.default_sampling_params, self.chat.override_max_tokens)
        params = openai.to_sampling_params(max_tokens, self.chat.default_sampling_params)
        params.output_kind = RequestOutputKind.DELTA  # a whole answer too: its first token is seen (Progress)
        params.structured_outputs = constraint
        self.metrics.visual_tokens.inc(visual_tokens)  # counted once the request is accepted

        engine_span = tracer.start_span("llm.engine", attributes={"gen_ai.usage.input_tokens": prompt_tokens,
                                                                  "dvd.visual_tokens": visual_tokens})
        # vLLM's own spans (--otlp-traces-endpoint: queue, prefill and decode times) join this trace under it.
        with trace.use_span(engine_span):  # only when vLLM traces too (else it warns on every request)
            trace_headers = dict(outgoing_metadata()) if self.engine.observability_config.otlp_traces_endpoint \
                else None
        progress = Progress(self.engine.generate(
            engine_input, params, request_id, trace_headers=trace_headers,
            **self.chat._engine_reasoning_kwargs(openai, parser, template_kwargs, prompt_ids)))
        try:
            async for body in answer(self.chat, openai, progress, request_id, template_kwargs, parser,
                                     _get_mm_token_counts(engine_input)):
                tokens = progress.new_tokens()
                if tokens and tokens == progress.tokens:
                    engine_span.add_event("first_token")
                yield llm_pb2.GenerateResponse(body=body, tokens=tokens)
        finally:
            engine_span.set_attributes({"gen_ai.usage.output_tokens": progress.tokens,
                                        "dvd.cached_tokens": progress.cached})
            engine_span.end()
        t_end = time.perf_counter()
        first_token_at = progress.first_token_at or t_end
        timings = llm_pb2.StageTimings(vision_seconds=t_vision - t0, queue_seconds=first_token_at - t_vision,
                                       embedding_bytes=fetched.bytes_received,
                                       vision_preprocess_seconds=fetched.summary.preprocess_seconds,
                                       vision_queue_seconds=fetched.summary.queue_seconds,
                                       vision_compute_seconds=fetched.summary.compute_seconds,
                                       decode_seconds=t_end - first_token_at)
        log.info("request done", extra={"request_id": request_id, "images": len(embeddings),
                                        "visual_tokens": visual_tokens, "prompt_tokens": prompt_tokens,
                                        "completion_tokens": progress.tokens, "cached_tokens": progress.cached,
                                        "vision_s": round(t_vision - t0, 4),
                                        "first_token_s": round(first_token_at - t_vision, 4),
                                        "total_s": round(t_end - t0, 4)})
        yield llm_pb2.GenerateResponse(
            usage=llm_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=progress.tokens,
                                visual_tokens=visual_tokens, cached_prompt_tokens=progress.cached),
            timings=timings,
        )
