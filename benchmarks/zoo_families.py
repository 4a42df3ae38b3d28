"""The model families of ``zoo_sweep.py``: every attention-bearing family fxprune can find
installed, with its smallest variant that has attention. timm families are timm's model
modules, torchvision's are its classification modules, and the Hugging Face architectures are
built from small configs (``HF_ARCHS``). ``NO_DOT_PRODUCT`` names the families whose attention
has no q.kᵀ product by design.

Example::

    python -c "import zoo_families; print(sorted(zoo_families.enumerate_families(['levit'])))"
"""

from __future__ import annotations

import inspect
import re

# size words of model names, smallest first: variants are tried in this order
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "micro", "ti", "tiny", "xs",
               "mini", "t", "lite", "small", "s", "b0", "s0", "l1", "m", "medium", "base", "b",
               "large", "l", "huge", "h", "giant", "g"]


def _size_rank(name: str) -> tuple:
    words = re.split(r"[_\-.]", name)
    ranks = [_SIZE_WORDS.index(w) for w in words if w in _SIZE_WORDS]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(_SIZE_WORDS) // 2, sum(numbers), len(name))


_ATTENTION_WORDS = ("softmax(", "scaled_dot_product_attention", ".softmax", "fused_attn",
                    "window_attention")


def _looks_like_attention(src: str) -> bool:
    if any(word in src for word in _ATTENTION_WORDS):
        return True
    # linear attention (k^T @ v) and additive attention (attn = f(q @ w)) have no softmax
    return re.search(r"transpose\([^)]*\)\s*@|@\s*\w+\.transpose|attn\w* = .*\w\s*@\s*\w",
                     src) is not None


def _has_attention(model) -> bool:
    """Some submodule's forward computes attention (softmax over scores, SDPA, or products
    of activations), read off the source of the forward methods: enumeration only."""
    import torch

    seen = set()
    for mod in model.modules():
        cls = type(mod)
        if isinstance(mod, torch.nn.MultiheadAttention):
            return True
        if cls in seen or cls.__module__.startswith("torch.nn"):
            continue
        seen.add(cls)
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if _looks_like_attention(src):
            return True
    return False


def _meta_params(build) -> tuple[int, bool] | None:
    import torch

    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001 - a variant that cannot be built is skipped
        return None
    return sum(p.numel() for p in model.parameters()), _has_attention(model)


#: families whose attention-like block has no query-key dot product, read off their source by
#: hand: for them the bar is the library saying "no dot-product attention" and the rest of the
#: model pruning to the target (status ``no-dpa``; the ratio still decides partial/below)
NO_DOT_PRODUCT = {
    "swiftformer": "additive attention: a learned vector scores q, no q·kᵀ",
    "efficientvim": "hidden-state mixer (SSD): x·(a*b)ᵀ then ·c, softmax over tokens",
    "efficientnet": "global-context block: softmax-pooled context, no q·kᵀ",
    "resnest": "split attention: softmax over radix branches of pooled channels",
    "sknet": "selective kernel: softmax over kernel branches of pooled channels",
}

#: families inside one timm module that differ in their attention (name patterns)
TIMM_SUBFAMILIES = {"eva_dinov3": "vit_*_dinov3", "eva_rope_vit": "vit_*_rope_*",
                    "eva_pe": "vit_pe_core_*", "beit3": "beit3_*"}


def _smallest_timm(names: list[str], tries: int = 4):
    import timm
    from timm.models import get_pretrained_cfg

    best = None
    for name in sorted(names, key=_size_rank)[:tries]:
        cfg = get_pretrained_cfg(name)
        size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
        found = _meta_params(lambda n=name: timm.create_model(n, pretrained=False))
        if found is None or not found[1]:
            continue
        cost = found[0] * size[1] * size[2]
        if best is None or cost < best[0]:
            best = (cost, name, size)
    return None if best is None else {"source": "timm", "model": best[1],
                                      "input": [1, *best[2]]}


def timm_families(only=None) -> dict[str, dict]:
    import timm

    groups = {m: timm.list_models(module=m) for m in timm.list_modules()}
    taken = set()
    for fam, pattern in TIMM_SUBFAMILIES.items():
        groups[fam] = timm.list_models(pattern)
        taken.update(groups[fam])
    out = {}
    for fam, names in groups.items():
        if only is not None and fam not in only:
            continue
        if fam not in TIMM_SUBFAMILIES:
            names = [n for n in names if n not in taken]
        spec = _smallest_timm(names) if names else None
        if spec is not None:
            out[fam] = spec
    return out


def torchvision_families(only=None) -> dict[str, dict]:
    import torchvision

    by_module: dict[str, list[str]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        by_module.setdefault(module, []).append(name)
    out = {}
    for module, names in sorted(by_module.items()):
        if only is not None and f"tv_{module}" not in only:
            continue
        best = None
        for name in sorted(names, key=_size_rank)[:6]:
            found = _meta_params(lambda n=name: torchvision.models.get_model(n))
            if found is None or not found[1]:
                continue
            if best is None or found[0] < best[0]:
                best = (found[0], name)
        if best is not None:
            out[f"tv_{module}"] = {"source": "torchvision", "model": best[1],
                                   "input": [1, 3, 224, 224]}
    return out


_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8)
_HIER = dict(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4])
#: Hugging Face architectures: config class -> small config (image size of the input)
HF_ARCHS = {
    "hf_vit": ("ViTConfig", _VIT), "hf_deit": ("DeiTConfig", _VIT),
    "hf_beit": ("BeitConfig", dict(_VIT, use_relative_position_bias=True)),
    "hf_data2vec_vision": ("Data2VecVisionConfig", _VIT),
    "hf_vit_msn": ("ViTMSNConfig", _VIT), "hf_ijepa": ("IJepaConfig", _VIT),
    "hf_dinov2": ("Dinov2Config", _VIT),
    "hf_dinov2_registers": ("Dinov2WithRegistersConfig", _VIT),
    "hf_dinov3": ("DINOv3ViTConfig", dict(_VIT, num_register_tokens=2)),
    "hf_clip_vision": ("CLIPVisionConfig", _VIT),
    "hf_siglip_vision": ("SiglipVisionConfig", _VIT),
    "hf_swin": ("SwinConfig", dict(_HIER, window_size=4)),
    "hf_swinv2": ("Swinv2Config", dict(_HIER, window_size=4)),
    "hf_levit": ("LevitConfig", dict(image_size=64, hidden_sizes=[64, 96],
                                     num_attention_heads=[2, 3],
                                     depths=[1, 1], key_dim=[16, 16],
                                     mlp_ratio=[2, 2], attention_ratio=[2, 2],
                                     down_ops=[["Subsample", 16, 4, 4, 2, 2]])),
    "hf_mobilevit": ("MobileViTConfig", dict(image_size=64)),
    "hf_pvt_v2": ("PvtV2Config", dict(hidden_sizes=[32, 64], num_encoder_blocks=2, depths=[1, 1],
                                      sr_ratios=[2, 1], num_attention_heads=[1, 2],
                                      patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[4, 4])),
    "hf_segformer": ("SegformerConfig", dict(hidden_sizes=[32, 64], num_encoder_blocks=2,
                                            depths=[1, 1], sr_ratios=[2, 1],
                                            num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                            strides=[4, 2], mlp_ratios=[4, 4])),
    "hf_yolos": ("YolosConfig", dict(_VIT, image_size=[32, 32], num_detection_tokens=4)),
    "hf_vitdet": ("VitDetConfig", dict(_VIT, pretrain_image_size=32)),
}


def hf_families() -> dict[str, dict]:
    try:
        import transformers
    except ImportError:
        return {}
    out = {}
    for fam, (cfg_name, kw) in HF_ARCHS.items():
        if hasattr(transformers, cfg_name):
            size = kw.get("image_size", 64)
            size = size[0] if isinstance(size, list) else size
            out[fam] = {"source": "hf", "model": cfg_name, "input": [1, 3, size, size]}
    return out


def enumerate_families(only=None) -> dict[str, dict]:
    """family -> spec of its smallest attention-bearing variant (``only``: just these)."""
    fams = {}
    fams.update(timm_families(only))
    fams.update(torchvision_families(only))
    fams.update({f: s for f, s in hf_families().items() if only is None or f in only})
    return fams
