"""megatron-core's dynamic inference engine wired to our GPTModel and a Hugging Face tokenizer.

The engine, context, controller and wrapper are megatron's (paged KV cache, continuous batching, chunked
prefill, pausing and eviction); this module only builds them for our model, strips the vocabulary padding
from the logits, adapts the tokenizer and lets the context keep prompt logits for scoring (`prompt_scores`).
`cpu_fallbacks` first replaces what this host lacks: on CPU the CUDA-only pieces, on a GPU without flash-attn
only the paged attention (`paged_attention`).
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
from megatron.core.inference.inference_request import DynamicInferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.models.gpt import GPTModel

from megatron_bdlora.frozen_linear import pack_frozen_linears
from megatron_bdlora.inference.cpu_fallbacks import apply_inference_fallbacks
from megatron_bdlora.inference.prompt_scores import PromptScoringContext


class HFTokenizerAdapter:
    """The tokenizer interface megatron's controller and engine call, over a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf_tokenizer = hf_tokenizer

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt; no special tokens (the controller adds BOS itself when asked)."""
        return self.hf_tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of generated ids (the engine fills `generated_text` of finished requests with it)."""
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eod(self) -> int:
        """Default termination id of a request (-1, never, when the tokenizer has no EOS)."""
        eos = self.hf_tokenizer.eos_token_id
        return -1 if eos is None else eos

    @property
    def bos(self) -> int | None:
        return self.hf_tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)


class _UnpaddedVocabGPTInferenceWrapper(GPTInferenceWrapper):
    """megatron's GPT wrapper whose logits stop at the real vocabulary.

    build_model pads the vocabulary to a multiple of TP with zero rows; megatron samples over every column
    it is given, so the padding ids would otherwise be drawn (logit 0 can win) and reach the tokenizer.
    """

    def _forward(self, inference_input):
        logits = super()._forward(inference_input)  # [1, tokens, padded vocab], gathered over TP
        return logits[..., : self.inference_wrapper_config.padded_vocab_size]  # [1, tokens, vocab]


def build_dynamic_engine(
    model: GPTModel,
    tokenizer,
    *,
    max_sequence_length: int,
    max_requests: int,
    max_tokens: int,
    buffer_size_gb: float,
    block_size_tokens: int,
    params_dtype: torch.dtype,
    materialize_only_last_token_logits: bool = True,
    enable_chunked_prefill: bool = True,
    random_seed: int = 0,
    request_metadata_types: list[tuple[str, torch.dtype, bool]] | None = None,
    paused_buffer_size_gb: float | None = None,
    controller_cls: type[TextGenerationController] = TextGenerationController,
    cuda_graphs: bool = False,
    num_cuda_graphs: int = 8,
) -> DynamicInferenceEngine:
    """megatron's DynamicInferenceEngine serving `model` (this rank's TP shard); every TP rank builds one.

    Call after `megatron_bdlora.parallel.init_parallel` (process groups, CPU shims) with the weights loaded.
    Drive it on every TP rank in lockstep, with the same requests in the same order:
    `engine.add_request(request_id, prompt_ids_or_text, SamplingParams(...))`, then
    `engine.step_modern()` while `engine.has_unfinished_requests()`; each step returns
    `finished_request_records` (`record.merge().generated_tokens`, also across evictions) and
    `active_request_ids`. Pass prompts as lists of ids or text, not tensors (megatron checks for a CUDA device).

    Args:
        model: our GPTModel (`megatron_bdlora.model.build_model`); put in eval mode here.
        tokenizer: a Hugging Face tokenizer; its EOS is the default termination id (`SamplingParams.termination_id`
            overrides it, -1 never stops early).
        max_sequence_length: longest prompt + generation of one request (requests beyond it fail at add time);
            also the length of each request's block table. E.g. the model's context length or less.
        max_requests: requests in the batch at once (paused ones included). Decode steps run
            min(max_requests, max_tokens, active rounded up to 64) token slots, so on CPU keep it near the
            batch you expect (e.g. 8-16): every slot is real compute.
        max_tokens: tokens per forward step (prompt chunks + one per decoding request); longer prompts are
            prefilled in chunks when `enable_chunked_prefill`. Must be a multiple of 64 (x TP): megatron pads
            mixed steps to that multiple. CPU: 64-256.
        buffer_size_gb: the paged KV cache, all layers of this rank; when it is full, requests that need a new
            block are paused, and evicted (re-queued with prompt + generated tokens) when the paused ones
            overflow. Bytes per block: 2 * layers * block_size_tokens * KV heads / TP * head dim * dtype size.
            CPU: enough for max_requests * max_sequence_length tokens (SmolLM2-135M, fp32, TP 1: 45 KiB per token).
        block_size_tokens: tokens per KV block (granularity of allocation and pausing). CPU: 16-64 (megatron's
            GPU default is 256).
        params_dtype: dtype of the KV cache and logits (normally the model's).
        materialize_only_last_token_logits: compute logits for each request's last token only (True), and for the
            prompt tokens of the requests being scored (`prompt_scores`, with SeededSamplingController).
        enable_chunked_prefill: split prompts longer than the free token budget across steps.
        random_seed: seed of the controller's sampling generator (megatron's engine only stores its own
            `random_seed`; sampling draws from `controller.sampling_rng`). Same seed on every TP rank.
        request_metadata_types: per-request fields the context tracks; must equal
            `DynamicInferenceRequest.get_metadata_types()` at the time requests are added (megatron asserts it
            in `add_request`), so extend that method and pass its result. None = its current value.
        paused_buffer_size_gb: part of `buffer_size_gb` kept for paused requests (None = 0: a paused request
            that cannot resume at once is evicted, except one allowed to overflow).
        controller_cls: megatron's TextGenerationController or a subclass (e.g. with its own sampling step).
        cuda_graphs: decode-only steps replay megatron's per-layer CUDA graphs, captured here for
            `num_cuda_graphs` decode batch sizes up to max_requests (the model must be built with
            `build_model(..., cuda_graphs=True)`); steps with prefill tokens, or larger, run eagerly.
    """
    apply_inference_fallbacks()
    expected_types = DynamicInferenceRequest.get_metadata_types()
    if request_metadata_types is None:
        request_metadata_types = expected_types
    elif list(request_metadata_types) != expected_types:
        raise ValueError(
            f"request_metadata_types {request_metadata_types} differ from DynamicInferenceRequest.get_metadata_types() "
            f"{expected_types}; megatron checks every added request against them"
        )
    config = model.config
    if cuda_graphs != (config.cuda_graph_impl == "local"):
        raise ValueError(f"cuda_graphs={cuda_graphs} but the model was built with cuda_graph_impl="
                         f"{config.cuda_graph_impl!r}: build_model(..., cuda_graphs={cuda_graphs})")
    tp = config.tensor_model_parallel_size
    if max_tokens % DynamicInferenceContext.round_up_tokens(1, tp):
        raise ValueError(
            f"max_tokens={max_tokens} must be a multiple of {DynamicInferenceContext.round_up_tokens(1, tp)} "
            "(megatron pads the tokens of a step up to that multiple)"
        )
    context = PromptScoringContext(  # megatron's, able to keep the logits of prompts being scored
        params_dtype=params_dtype,
        num_layers=config.num_layers,
        kv_channels=config.kv_channels,
        num_attention_heads=config.num_query_groups,  # the cache holds one K and V per query group
        max_sequence_length=max_sequence_length,
        buffer_size_gb=buffer_size_gb,
        paused_buffer_size_gb=paused_buffer_size_gb,
        max_requests=max_requests,
        max_tokens=max_tokens,
        block_size_tokens=block_size_tokens,
        tensor_model_parallel_size=tp,
        materialize_only_last_token_logits=materialize_only_last_token_logits,
        request_metadata_types=request_metadata_types,
        use_flashinfer_fused_rope=False,
        num_cuda_graphs=num_cuda_graphs if cuda_graphs else None,
        use_cuda_graphs_for_non_decode_steps=False,
    )
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # no pipeline micro-batching
        padded_vocab_size=model.hf_config["vocab_size"],  # the logits' width once the TP padding is cut off
        inference_max_requests=max_requests,
        inference_max_seq_length=max_sequence_length,
        fp32_residual_connection=config.fp32_residual_connection,
    )
    wrapper = _UnpaddedVocabGPTInferenceWrapper(model, wrapper_config, context)
    wrapper.prep_model_for_inference()  # eval mode, context reset
    if next(model.parameters()).device.type == "cpu":
        pack_frozen_linears(model)  # oneDNN with packed weights: 2-4x MKL's matmul on our CPU hosts
    controller = controller_cls(wrapper, HFTokenizerAdapter(tokenizer))
    controller.sampling_rng.manual_seed(random_seed)
    return DynamicInferenceEngine(
        controller,
        context,
        random_seed=random_seed,
        enable_chunked_prefill=enable_chunked_prefill,
    )
