"""Ray Jobs entrypoint: runs one patchflow step on the cluster the job was submitted to.

The job's driver runs on the head node with RAY_ADDRESS set, so ``pipeline.cluster.init_ray``
joins the cluster instead of starting a local one; the code is the CLI's, unchanged:

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' \\
        -- python jobs/entrypoint.py sweep --config configs/sweeps/demo.yaml

Paths in the config must be visible from every node (a shared volume or s3://).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
