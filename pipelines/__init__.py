"""The Kubeflow (kfp v2) pipeline of sdsclip: see sdsclip_pipeline.py."""
