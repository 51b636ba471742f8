"""``avpt knowledge``: CILMP's per-class knowledge states from a local Hugging Face causal LM.

The CILMP paper feeds an LLM's hidden representations of each class into its interventions; the
authors' code (usr922/cilmp, ``trainers/cilmp.py``) loads them, one tensor [L_c, 4096] per class,
from ``llm_representations/<data set>/<class>.pth`` (a LLaMA-sized width), made by a script that
was not published. This command makes states of that kind from any local causal LM folder
(``AutoModelForCausalLM`` + ``AutoTokenizer``, ``local_files_only``: nothing is downloaded):

  h_c = the last layer's hidden states (``output_hidden_states[-1]``, after the model's final
        norm where it has one) of every token of each description text of class c (the
        tokenizer's begin-of-sequence token dropped), texts concatenated in their order, the
        first ``max_tokens`` kept: [L_c, d_model] float32.

Texts: the project's BI-RADS descriptions (``avpt.methods.cilmp.descriptions``) or a JSON file
``{class name: [text, ...]}``. Output: ``OUT/<class name>.safetensors`` (key ``states``), read by
``CILMPConfig.knowledge_dir`` (``avpt.methods.cilmp.knowledge.load_knowledge_dir``), and ``OUT/knowledge.json``
naming the model, which CILMP's run rows carry ("CILMP, <model> knowledge").
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .methods.cilmp.knowledge import CLIP_TEXT_SOURCE, META_FILE, knowledge_source  # noqa: F401



@torch.no_grad()
def llm_states(model, tokenizer, texts: Dict[str, Sequence[str]], class_names: Sequence[str],
               max_tokens: Optional[int] = None) -> List[Tensor]:
    """h_c [L_c, d_model] float32 per class of ``class_names`` (see the module docstring)."""
    device = next(model.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    states = []
    for name in class_names:
        if not texts.get(name):
            raise ValueError(f"no description text for class {name!r}; classes with texts: "
                             f"{sorted(texts)}")
        parts = []
        for text in texts[name]:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)       # [1, S]
            out = model(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[-1][0]                                     # [S, d]
            if bos is not None and ids.shape[1] > 1 and int(ids[0, 0]) == bos:
                hidden = hidden[1:]
            parts.append(hidden.float().cpu())
        h = torch.cat(parts, dim=0)
        states.append(h[:max_tokens].clone() if max_tokens else h)
    return states


def load_causal_lm(model_dir: str, device="cpu", dtype=torch.float32):
    """(model in eval mode, tokenizer) from a local folder; ValueError (one line) otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .local_backbone import hf_offline

    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model-dir {model_dir!r} is not a Hugging Face model folder "
                         f"(config.json, weights and tokenizer files; nothing is downloaded)")
    try:
        with hf_offline():
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                         dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model-dir {model_dir!r}: not loadable as a causal LM with its "
                         f"tokenizer ({' '.join(str(exc).split())[:200]})") from None
    return model.to(device).eval(), tokenizer


def model_label(model_dir: str) -> str:
    """The model's name for run rows: config.json's ``_name_or_path`` when it is a hub-style
    name, else the folder's name."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            name = json.load(f).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    if not name or os.path.isabs(name) or name.startswith("."):
        name = os.path.basename(os.path.normpath(model_dir))
    return name


def write_knowledge_dir(out: str, class_names: Sequence[str], states: Sequence[Tensor],
                        meta: Dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    for name, h in zip(class_names, states):
        save_file({"states": h.contiguous()}, os.path.join(out, f"{name}.safetensors"))
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def _texts(path: Optional[str], class_names: Sequence[str]) -> Dict[str, List[str]]:
    from .methods.cilmp.descriptions import descriptions_for

    if path is None:
        return {n: list(descriptions_for(n)) for n in class_names}
    try:
        with open(path) as f:
            texts = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--texts {path!r} is not a readable JSON file ({exc})") from None
    def is_texts(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v)
    if not isinstance(texts, dict) or not all(is_texts(v) for v in texts.values()):
        raise ValueError(f"--texts {path!r}: expected {{class name: [text, ...]}}")
    return texts


def main(args) -> int:
    from .methods.cilmp.descriptions import texts_hash
    from .validate import ConfigError

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise ConfigError(f"--out {args.out!r} is not empty (--overwrite replaces its files)")
    class_names = list(args.class_names)
    texts = _texts(args.texts, class_names)
    missing = [n for n in class_names if n not in texts]
    if missing:
        raise ConfigError(f"--texts {args.texts!r} has no texts for {missing}")
    model, tokenizer = load_causal_lm(args.model_dir, args.device)
    states = llm_states(model, tokenizer, texts, class_names, args.max_tokens)
    label = model_label(args.model_dir)
    used = {n: list(texts[n]) for n in class_names}
    meta = {"model": label, "model_dir": os.path.abspath(args.model_dir),
            "layer": "last (output_hidden_states[-1])", "width": int(states[0].shape[1]),
            "lengths": {n: int(h.shape[0]) for n, h in zip(class_names, states)},
            "max_tokens": args.max_tokens, "texts": used, "texts_hash": texts_hash(used)}
    write_knowledge_dir(args.out, class_names, states, meta)
    print(f"knowledge: {len(class_names)} classes, d_k = {meta['width']}, lengths "
          f"{list(meta['lengths'].values())} from {label} -> {args.out} "
          f"(use --set model.knowledge_dir={args.out})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``avpt knowledge`` on an argparse subparsers object; returns the parser."""
    from .methods.cilmp import CILMPConfig

    p = subparsers.add_parser(
        "knowledge", help="CILMP knowledge states from a local causal LM folder",
        description="avpt knowledge: per-class hidden states of a local Hugging Face causal LM "
                    "on each class's description texts, for CILMP's model.knowledge_dir "
                    "(nothing is downloaded)")
    p.add_argument("--model-dir", required=True, help="local causal LM folder (config.json, "
                   "weights, tokenizer)")
    p.add_argument("--out", required=True, help="output folder (<class name>.safetensors)")
    p.add_argument("--class-names", nargs="+", default=list(CILMPConfig.class_names),
                   help="the run's class names, as model.class_names (default: CILMP's)")
    p.add_argument("--texts", help="JSON {class name: [text, ...]} (default: the project's "
                   "BI-RADS descriptions)")
    p.add_argument("--max-tokens", type=int, default=16,
                   help="states kept per class (default 16, CILMP's knowledge_length; they "
                        "must fit the CLIP text context with the class name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=main)
    return p


__all__ = ["llm_states", "load_causal_lm", "write_knowledge_dir", "knowledge_source",
           "model_label", "CLIP_TEXT_SOURCE"]
