"""Hugging Face interop: import a local HF folder as a Pathways checkpoint, export one back."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "import-hf",
        help="import a local Hugging Face GPT-2/Llama folder "
        "(config.json + safetensors) as a Pathways checkpoint",
    )
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--split", help="layers per attention module, e.g. 6,6 (default: one module)")
    p.add_argument(
        "--max-seq-len", type=int, help="cap the context of a RoPE model (KV cache size)"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export-hf", help="write a checkpoint's pathway as a Hugging Face folder")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--out", required=True, help="Hugging Face folder to write")
    p.add_argument("--pathway", help="pathway to export (default: the spec's first)")
    p.set_defaults(func=cmd_export)


def cmd_import(args) -> int:
    from pathways.hf import convert

    imported = convert.import_hf(args.hf_dir, args.out, args.split, args.max_seq_len)
    spec = imported.spec
    for name in spec.pathway(imported.pathway).modules:
        cfg = spec.modules[name]
        n = getattr(cfg, "n_layers", None)  # the block stacks an import splits the model into
        layers = "" if n is None else f", {n} layer{'s' * (n != 1)}"
        print(f"  {name:<10} {cfg.kind}{layers}")
    if imported.tokenizer is None:
        print(
            f"note: {args.hf_dir} has no tokenizer.json; the spec uses the byte tokenizer, so "
            f"only token-id interfaces match the model",
            file=sys.stderr,
        )
    print(f"imported {args.hf_dir} as pathway {imported.pathway!r} into {args.out}")
    return 0


def cmd_export(args) -> int:
    from pathways.hf import convert

    out = convert.export_hf(args.checkpoint, args.out, args.pathway)
    print(f"exported {args.checkpoint} to {out}")
    return 0
