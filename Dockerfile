# GPU training image: docker build -t minillm . && docker run --gpus all minillm rope=xpos
# The base image ships a CUDA build of torch; pip keeps it because pyproject accepts that version.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /minillm
COPY pyproject.toml README.md ./
COPY minillm ./minillm
RUN pip install --no-cache-dir -e ".[interop]"
COPY conf ./conf
COPY scripts ./scripts

# W&B goes online when WANDB_API_KEY is passed in (-e WANDB_API_KEY=...), offline otherwise.
ENTRYPOINT ["python", "scripts/train.py", "trainer=gpu"]
