"""Tiny Wan2.1 pipelines built in code from a seed: no download, seconds on CPU.

They have the real architecture (diffusers' WanTransformer3DModel, AutoencoderKLWan, UMT5 text encoder,
CLIP vision encoder for I2V) at toy width, random weights. Tests and the offline demo use them.
"""

from __future__ import annotations

import torch

# Small word-level vocabulary: prompts become real token sequences, unknown words map to <unk>.
_SPECIAL = ["<pad>", "</s>", "<unk>"]
_WORDS = (
    "a an the of in on at with and to from over under near by is are red green blue yellow white black "
    "orange purple cat dog bird fish horse person man woman child car boat tree forest city street "
    "river ocean mountain sky sun moon night day snow rain fire light dark fast slow running walking "
    "flying swimming camera pan zoom close up view shot style painting cartoon realistic video scene "
    "circle square triangle ball moves bounces rotates grows left right background"
).split()
TINY_TEXT_DIM = 32
TINY_IMAGE_DIM = 32


def build_tokenizer(extra_words: tuple[str, ...] = ()):
    """Word-level tokenizer over the tiny vocabulary; ``extra_words`` are appended (after it, so the ids of
    the tiny words never change)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = _SPECIAL + _WORDS + [w for w in dict.fromkeys(extra_words) if w not in _WORDS and w not in _SPECIAL]
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _transformer(i2v: bool):
    from diffusers import WanTransformer3DModel

    heads, head_dim = 2, 16
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=36 if i2v else 16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=TINY_IMAGE_DIM if i2v else None,
        added_kv_proj_dim=heads * head_dim if i2v else None,
        rope_max_seq_len=32,
    )


def cast_transformer(transformer, dtype: torch.dtype):
    """Cast like diffusers' from_pretrained(torch_dtype=...): tensors Wan keeps in fp32 stay fp32."""
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return transformer


def build_tiny_pipeline(task: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A WanPipeline (task "t2v") or WanImageToVideoPipeline ("i2v") with random tiny weights.

    The transformer is in ``dtype``; VAE and encoders stay fp32 (as with real Wan checkpoints).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    i2v = task == "i2v"
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        ).eval()
        vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
        transformer = cast_transformer(_transformer(i2v), dtype).eval()
        image_parts = {}
        if i2v:
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

            image_parts["image_encoder"] = CLIPVisionModel(
                CLIPVisionConfig(hidden_size=TINY_IMAGE_DIM, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=32, patch_size=8, projection_dim=TINY_IMAGE_DIM)
            ).eval()
            image_parts["image_processor"] = CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    cls = WanImageToVideoPipeline if i2v else WanPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
               transformer=transformer, **image_parts)
