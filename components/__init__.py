"""Kubeflow (kfp v2) lightweight components of the sdsclip pipeline, one per stage of dvc.yaml.

Each component is a plain, typed Python function that imports ``sdsclip`` inside its body and calls the
matching ``sdsclip.stages`` function; kfp ships only the function's source, so the container image must
have the ``sdsclip`` package installed (no ``packages_to_install``). ``make_components(base_image)``
turns the functions into components that run in ``base_image`` (the CPU image); the pipeline moves its GPU
tasks to the CUDA image per task (``set_container_image``), so one set of components serves both, and the
same pipeline runs on a cluster and locally (kfp.local).

Every stage takes ``params``: the effective params.yaml text produced once by ``resolve_params``.
"""

from types import SimpleNamespace

from kfp import dsl

from components import data, evaluation, multinode, training

DEFAULT_IMAGE = "ghcr.io/sdsclip/sdsclip:0.1.0"  # docker/Dockerfile.cpu
DEFAULT_GPU_IMAGE = "ghcr.io/sdsclip/sdsclip:0.1.0-cuda"  # docker/Dockerfile.cuda

FUNCTIONS = (
    data.resolve_params,
    data.synth,
    data.ingest,
    data.validate,
    training.pretrain_student,
    training.pretrain_teacher,
    training.train,
    multinode.train_multinode,
    evaluation.evaluate_winoground,
    evaluation.evaluate_aro,
    evaluation.evaluate_zeroshot,
    evaluation.derive_sugarcrepe,
    evaluation.evaluate_sugarcrepe,
    evaluation.teacher_shards,
    evaluation.evaluate_shard,
    evaluation.merge_shards,
    evaluation.report,
    evaluation.register,
)


def make_components(base_image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """All components, built for ``base_image`` (which must contain sdsclip and kfp)."""
    build = dsl.component(base_image=base_image, install_kfp_package=False)
    return SimpleNamespace(**{fn.__name__: build(fn) for fn in FUNCTIONS})
