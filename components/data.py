"""Components for params and data: resolve_params -> synth -> ingest -> validate.

Lightweight components: only each function's source is shipped, so everything is imported inside the
body (no module-level helpers, no ``from __future__ import annotations``).
"""

from kfp.dsl import Dataset, Input, Output


def resolve_params(params_yaml: str, seed: int, device: str, lambda_sds: float, train_steps: int) -> str:
    """params.yaml text + the UI overrides -> the validated, effective params (YAML) every stage reads."""
    import yaml

    from sdsclip.config import params_from_dict, params_to_dict

    raw = yaml.safe_load(params_yaml) or {}
    raw.update(seed=seed, device=device)
    raw["train"] = {**raw.get("train", {}), "lambda_sds": lambda_sds, "steps": train_steps}
    return yaml.safe_dump(params_to_dict(params_from_dict(raw, "params_yaml")), sort_keys=False)


def synth(params: str, world: Output[Dataset]):
    """Render the synthetic world (COCO / Winoground / ARO / ImageFolder formats)."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    world.metadata.update(stages.synth(params_from_dict(yaml.safe_load(params)), Path(world.path)))


def ingest(params: str, world: Input[Dataset], shards: Output[Dataset]):
    """COCO captions + images -> WebDataset shards + manifest per split. A relative data.coco_root under
    data/world/ (the DVC layout) points into the synth output; an absolute one is used as is."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    coco_root = Path(p.data.coco_root)
    if coco_root.parts[:2] == ("data", "world"):
        coco_root = Path(world.path, *coco_root.parts[2:])
    result = stages.ingest(p, coco_root, Path(shards.path))
    shards.metadata.update({f"{split}.{k}": v for split, summary in result.items()
                            for k, v in summary.items() if isinstance(v, (int, float))})


def validate(params: str, shards: Input[Dataset], validated: Output[Dataset]):
    """Great Expectations over each split's manifest: accepted.csv / quarantine.csv; fails past threshold."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    result = stages.validate(p, Path(shards.path), Path(validated.path))
    validated.metadata.update({f"{split}.{k}": v for split, summary in result.items()
                               for k, v in summary.items() if isinstance(v, (int, float))})
