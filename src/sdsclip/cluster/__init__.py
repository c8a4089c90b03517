"""The Kubernetes side of sdsclip, set apart from the model library.

``jobspec``: the multi-node training PyTorchJob as data (settings, rendered manifest, schema checks; no API
calls; ``sdsclip.config`` imports it to check params.yaml's ``multinode:`` section). ``pytorchjob``: the
Kubernetes client that submits that job, waits for it and copies its model back (the pipeline's multi-node
training step). ``kfp_submit``: the Kubeflow Pipelines client that submits the compiled pipeline as a run or a
recurring run (``sdsclip pipeline submit``).
"""
