"""Tiny twins: one small open_clip config per recipe, same architecture family, seconds to export.

Every recipe must have a twin here (test_every_recipe_has_a_twin fails otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The text towers keep the real vocabulary and context length so the real CLIP tokenizer applies.
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}

TWINS: dict[str, dict[str, Any]] = {
    "vit": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
        "text_cfg": _TINY_TEXT,
    },
    "timm": {
        "embed_dim": 24,
        # timm's smallest ViT (5.7 M parameters, 12 blocks of width 192); timm builds it for 224x224
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear", "image_size": 224},
        "text_cfg": _TINY_TEXT,
    },
    "hf_text": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
        # "{dir}" is the twin's directory: write_twin puts a tiny XLM-R config and tokenizer there
        "text_cfg": {"hf_model_name": "{dir}/text-model", "hf_tokenizer_name": "{dir}/text-model",
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"},
    },
    # built by write_tiny_hf_clip (a transformers CLIPConfig), described here by its sizes
    "hf_clip": {"source": "transformers", "embed_dim": 24, "vision_cfg": {"image_size": 32, "patch_size": 8},
                "text_cfg": {"context_length": 77, "vocab_size": 49408}},
    # coca_ViT-B-32 in small: attentional pooler on the image tower, CLS token after the text,
    # and a caption decoder (not exported); context 76 as CoCa's
    # (width 96: the int8 twin-level parity of the pooler needs more than 48)
    "coca": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {**_TINY_TEXT, "context_length": 76, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    },
    "modified_resnet": {
        "embed_dim": 24,
        # width 8 -> stage widths 8..256, attention pool over a 2x2 grid with 4 heads
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": _TINY_TEXT,
    },
}


# A tiny XLM-RoBERTa: the special ids of the real one (<s>=0, <pad>=1, </s>=2), 2 layers of width 32.
TINY_XLMR = {
    "architectures": ["XLMRobertaForMaskedLM"], "model_type": "xlm-roberta", "vocab_size": 512,
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 80, "type_vocab_size": 1, "initializer_range": 0.02, "layer_norm_eps": 1e-5,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute",
}
WORDS = ("a photo of the an dog cat car red blue small large picture drawing diagram city night day sea "
         "tree house person people two one on in with at une d'un café paris très").split()


def write_tiny_hf_text_model(directory: Path, tokenizer: bool = True) -> None:
    """A local directory of 'hub files': config.json and, optionally, a word-level tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_XLMR))
    if not tokenizer:
        return
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(directory))


def write_tiny_hf_clip(directory: Path, weights: bool = False, seed: int = 0) -> str:
    """A transformers CLIPModel twin saved with save_pretrained: config only, or config + weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    if weights:
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(str(directory))
    else:
        config.save_pretrained(str(directory))
    return f"hf:{directory}"


def write_twin(recipe: str, directory: Path, tokenizer: bool = True) -> str:
    """Write an open_clip `local-dir:` model directory for a recipe's twin; return the model name."""
    directory.mkdir(parents=True, exist_ok=True)
    if recipe == "hf_clip":
        return write_tiny_hf_clip(directory)
    cfg = json.loads(json.dumps(TWINS[recipe]).replace("{dir}", str(directory)))
    if recipe == "hf_text":
        write_tiny_hf_text_model(directory / "text-model", tokenizer=tokenizer)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{directory}"


def fp32_twin_graphs(family: str, directory: Path, seed: int = 1) -> tuple[Any, dict[str, tuple[Any, Any, bool]]]:
    """A twin's reference and, per tower, (reference module, fp32 ONNX graph after the fp32
    passes, trimmable?): exported the way the build does, for tests of later passes."""
    import torch

    from clipexport.build import _export_module, _trimmable
    from clipexport.export import export_tower
    from clipexport.models import load_reference
    from clipexport.models.towers import attention_blocks
    from clipexport.passes import PassConfig, run_passes
    from clipexport.recipes import BatchRange, load_recipes

    ref = load_reference(write_twin(family, directory), "none", seed=seed)
    recipe = load_recipes()[family]
    out = {}
    for tower in ("image", "text"):
        trim = _trimmable(ref, tower, recipe.towers[tower])[0]  # as the build decides
        exported = _export_module(ref, ref.tower(tower), trim)
        module = ref.tower(tower)  # the reference the build compares against
        example = torch.randn(2, 3, ref.image_size, ref.image_size) if tower == "image" else ref.tokenizer()(["a", "b"])
        fuse = recipe.attention == "onnx"
        graph = export_tower(exported, example, recipe.towers[tower], BatchRange(1, 8, 64), recipe.opset,
                             max_sequence=77 if trim else None, fuse_attention=fuse)
        cfg = PassConfig(tower=tower, precision="fp32", attention_blocks=attention_blocks(exported), trim_text=trim)
        graph, _ = run_passes(graph, cfg, disabled=[] if fuse else ["fuse_attention"])
        out[tower] = (module, graph, trim)
    return ref, out


# Tiny twins of the other Hugging Face text towers, outside TWINS (they share the hf_text recipe,
# and every TWINS entry costs each parametrized test a build): write_hf_text_twin builds them.
# A tiny mT5 encoder (T5 ids: <pad>=0, </s>=1, no BOS; relative position buckets; gated GELU).
TINY_MT5 = {
    "architectures": ["MT5ForConditionalGeneration"], "model_type": "mt5", "vocab_size": 512, "d_model": 32,
    "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 1, "num_heads": 2,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0, "is_encoder_decoder": True, "tie_word_embeddings": False,
}
# A tiny M2M100 encoder as NLLB uses it (<s>=0, <pad>=1, </s>=2; scaled embeddings, sinusoidal positions).
TINY_M2M100 = {
    "architectures": ["M2M100ForConditionalGeneration"], "model_type": "m2m_100", "vocab_size": 512, "d_model": 32,
    "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "activation_function": "relu", "max_position_embeddings": 128,
    "scale_embedding": True, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "decoder_start_token_id": 2, "is_encoder_decoder": True,
}
_HF_TEXT_CFG = {"hf_model_name": "{dir}/text-model", "hf_tokenizer_name": "{dir}/text-model"}
HF_TEXT_TWINS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # mt5-base-ViT-B-32: VisionTransformer + mT5 encoder, mean pooling, MLP projection (open_clip's default)
    "mt5": ({"embed_dim": 24,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
             "text_cfg": {**_HF_TEXT_CFG, "hf_pooler_type": "mean_pooler"}}, TINY_MT5),
    # nllb-clip-base-siglip: timm ViT with MAP pooling and no projection + NLLB encoder, first-token
    # pooling, linear projection. timm's test_vit: 0.35 M parameters, width 64, 160x160.
    "nllb_siglip": ({"embed_dim": 64, "custom_text": True, "init_logit_bias": -10,
                     "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                                    "timm_pool": "map", "timm_proj": "none"},
                     "text_cfg": {**_HF_TEXT_CFG, "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}},
                    TINY_M2M100),
}


def write_t5_style_tokenizer(directory: Path) -> None:
    """A word-level tokenizer with T5's special ids: <pad>=0, </s>=1, <unk>=2, and </s> appended only."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(directory))


def write_hf_text_twin(kind: str, directory: Path, tokenizer: bool = False) -> str:
    """Write a `local-dir:` twin of HF_TEXT_TWINS[kind] (its text config under text-model/); return the
    model name. Without `tokenizer` the build has no tokenizer files, as offline for the real models."""
    cfg, text_model = HF_TEXT_TWINS[kind]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "text-model").mkdir(exist_ok=True)
    (directory / "text-model" / "config.json").write_text(json.dumps(text_model))
    if tokenizer:
        if kind != "mt5":
            raise ValueError(f"no tokenizer twin for {kind!r}")
        write_t5_style_tokenizer(directory / "text-model")
    model_cfg = json.loads(json.dumps(cfg).replace("{dir}", str(directory)))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return f"local-dir:{directory}"


# Tiny twins of the built-in text transformer fed by a Hugging Face tokenizer (recipe
# hf_tokenizer_text), outside TWINS for the same reason as HF_TEXT_TWINS. No tokenizer files are
# written: the build runs on synthetic ids, as offline for SigLIP, CLIPA and the worldwide ViTs.
HF_TOKENIZER_TEXT_TWINS: dict[str, dict[str, Any]] = {
    # ViT-B-16-SigLIP: timm ViT (MAP pooling, no projection), text without causal mask, 'last' pooling
    "siglip": {"embed_dim": 64, "init_logit_bias": -10,
               "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                              "timm_pool": "map", "timm_proj": "none"},
               "text_cfg": {"context_length": 64, "vocab_size": 32000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                            "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 2,
                            "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                            "norm_kwargs": {"eps": 1e-6}}},
    # ViT-H-14-CLIPA: open_clip ViT (no ln_pre, average pooling), text without causal mask, 'last' pooling
    "clipa": {"embed_dim": 24,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8,
                             "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
              "text_cfg": {"context_length": 32, "vocab_size": 1024, "hf_tokenizer_name": "bert-base-uncased",
                           "tokenizer_kwargs": {"strip_sep_token": True}, "width": 32, "heads": 2, "layers": 2,
                           "pool_type": "last", "no_causal_mask": True}},
    # ViT-H-14-worldwide: open_clip ViT, causal text with 'eos' pooling on XLM-V's </s>=2
    "worldwide": {"embed_dim": 24,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
                  "text_cfg": {"hf_tokenizer_name": "facebook/xlm-v-base", "pool_type": "eos", "eos_id": 2,
                               "context_length": 77, "vocab_size": 1024, "width": 32, "heads": 2, "layers": 2}},
}


def write_hf_tokenizer_text_twin(kind: str, directory: Path) -> str:
    """Write a `local-dir:` twin of HF_TOKENIZER_TEXT_TWINS[kind]; return the model name."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": HF_TOKENIZER_TEXT_TWINS[kind]}))
    return f"local-dir:{directory}"
