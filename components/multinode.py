"""Multi-node training component: the same fine-tuning as ``training.train``, run as a Kubeflow PyTorchJob
over ``num_nodes`` pods instead of inside this step's own pod.

The step stages its inputs onto the shared data PVC (which the pipeline mounts here at /mnt/data), submits
the job rendered from k8s/training/pytorchjob.yaml, waits for it and copies the trained model back into its
output. Everything is in ``sdsclip.cluster.pytorchjob.run_multinode_training``; this is the kfp wrapper (imports
inside the body: kfp ships only the function's source).
"""
# No `from __future__ import annotations`: kfp reads the parameter annotations as types.

from kfp.dsl import Dataset, Input, Model, Output


def train_multinode(
    params: str,
    student: Input[Model],
    teacher: Input[Model],
    shards: Input[Dataset],
    validated: Input[Dataset],
    control: bool,
    num_nodes: int,
    gpus_per_node: int,
    image: str,
    model: Output[Model],
):
    """Fine-tune the student (L_CLIP + lambda * L_SDS; control: lambda = 0) as a PyTorchJob of num_nodes
    pods (1 Master + num_nodes - 1 Workers) with gpus_per_node GPUs each, running `image`."""
    import logging
    from pathlib import Path

    from sdsclip.cluster.pytorchjob import run_multinode_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    inputs = {"student": student, "teacher": teacher, "shards": shards, "validated": validated}
    meta = run_multinode_training(
        params,
        {key: Path(artifact.path) for key, artifact in inputs.items()},
        Path(model.path),
        control=control,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        image=image,
        # the upstream artifacts' URIs: a retry of this step re-attaches to the job it started
        job_key=" ".join(artifact.uri for artifact in inputs.values()),
    )
    model.metadata.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str))})
