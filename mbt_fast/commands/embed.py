"""``mbt-fast embed``: video files -> per-clip embeddings in one ``.safetensors`` or ``.npz`` file.

One row per readable file, in input order: ``files`` (their paths), each modality's CLS after
``encoder_norm`` (NaN rows where a file lacks the modality, ``present_<modality>`` says which),
``mean`` (the mean over the modalities present) and, with ``--bottleneck``, the bottleneck tokens
``[n, n_bottleneck_tokens, C]``; with ``--num-clips K`` each is the mean over the K clips. Files that
could not be read are listed (``skipped``) and left out.

Examples::

    mbt-fast embed as.safetensors videos/ --out emb.npz
    mbt-fast embed as.safetensors list.csv --out emb.safetensors --bottleneck --num-clips 4
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mbt_fast.commands.predict import add_model_arguments, files_kw, open_model

SUFFIXES = (".safetensors", ".npz")


def embed_fn(bottleneck: bool):
    def fn(model, inputs):
        return model.embed(**inputs, missing="drop", bottleneck=bottleneck)
    return fn


def write(out: Path, arrays: dict, files: list[str], skipped: list[str]) -> None:
    """Write ``arrays`` (name -> numpy array) and the file lists to ``out`` (tmp file, then rename)."""
    import numpy as np

    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    if out.suffix == ".npz":
        np.savez(tmp, files=np.array(files, dtype=str), skipped=np.array(skipped, dtype=str), **arrays)
    else:
        import torch
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(tmp),
                  metadata={"files": json.dumps(files), "skipped": json.dumps(skipped)})
    os.replace(tmp, out)


def run(args) -> int:
    import numpy as np
    import torch

    from mbt_fast import inference

    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        print(f"mbt-fast embed: --out {out}: expected a file name ending in {' or '.join(SUFFIXES)}", file=sys.stderr)
        return 2
    if out.exists() and not args.overwrite:
        print(f"mbt-fast embed: --out {out} exists (--overwrite replaces it)", file=sys.stderr)
        return 2
    model = open_model(args, "mbt-fast embed")
    if model is None:
        return 2
    try:
        paths = inference.expand_sources(args.files)
    except (ValueError, OSError) as e:
        print(f"mbt-fast embed: {e}", file=sys.stderr)
        return 2
    rows, files, skipped = [], [], []
    try:
        for path, clip, emb, error in inference.run_files(model, paths, embed_fn(args.bottleneck), **files_kw(args)):
            if error is not None:
                skipped.append(path)
                print(f"mbt-fast embed: skipped {error}", file=sys.stderr)
                continue
            files.append(path)
            rows.append(emb)
    except ValueError as e:  # e.g. --bottleneck on a model without bottleneck tokens
        print(f"mbt-fast embed: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"mbt-fast embed: none of the {len(paths)} file(s) could be read; nothing written", file=sys.stderr)
        return 1
    keys = list(dict.fromkeys(k for r in rows for k in r))  # modalities (in model order), mean, bottleneck
    arrays = {}
    for k in keys:
        like = next(r[k] for r in rows if k in r)
        arrays[k] = torch.stack([r.get(k, torch.full_like(like, float("nan"))) for r in rows]).numpy()
        if k not in ("mean", "bottleneck"):
            arrays[f"present_{k}"] = np.array([k in r for r in rows])
    write(out, arrays, files, skipped)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if not k.startswith("present_"))
    print(f"wrote {out}: {len(files)} file(s): {shapes}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return 1 if skipped else 0


def register(sub) -> None:
    p = sub.add_parser("embed", help="video files -> per-clip embeddings (.safetensors or .npz)",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output file, .safetensors or .npz")
    p.add_argument("--bottleneck", action="store_true", help="also the bottleneck tokens after the last layer")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
