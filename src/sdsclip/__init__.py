"""sdsclip: SDS-CLIP (Basu et al., arXiv 2307.09233) as a reproducible DVC + Kubeflow pipeline.

Map of the library: config (params.yaml schema), synth (synthetic world), ingest + validate (COCO ->
WebDataset + Great Expectations), data (training reader), models/ (open_clip student, diffusers
teacher), sds (the SDS-CLIP loss), train (training loops), scoring + evaluate/ (benchmarks),
register (MLflow), stages (one function per pipeline stage), cli (the `sdsclip` command).
"""

__version__ = "0.1.0"
