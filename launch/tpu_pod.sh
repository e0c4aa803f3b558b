#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM slice (jax.distributed finds the other hosts itself).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#     python -m teacherlm_jax.curriculum --gin_file=gin/curriculum/teacherlm.gin \
#       --gin_file=gin/models/bloom_7b1.gin --gin.MODEL_DIR="'gs://bucket/teacherlm'" \
#       --gin.TOKENIZER_PATH="'gs://bucket/bloom-7b1/tokenizer.json'"
#
# Expects the repository at $REPO_DIR (default ~/teacherlm-jax) on every worker with the package installed
# (pip install -c constraints.txt -e . && pip install "jax[tpu]==<the constraints' jax version>").
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo_dir=${REPO_DIR:-'~/teacherlm-jax'}
command=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $repo_dir && $command"
