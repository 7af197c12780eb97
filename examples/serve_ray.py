"""Replicas of a model behind Ray Serve, with the OpenAI routes and chat page of `tinyllama2 serve` (pip install -e ".[ray]").

  python examples/serve_ray.py                                   # 2 replicas of the bundled model on port 8000
  python examples/serve_ray.py --replicas 4 --model path/to/llama-2-7b-chat-hf --port 8080
  RAY_ADDRESS=auto python examples/serve_ray.py --replicas 8     # on a running Ray cluster, spread over its machines

The same as `tinyllama2 serve --ray` (every flag of `tinyllama2 serve` works). A conversation's next turn goes to the
replica holding its earlier turns; other requests to the least busy replica. Ctrl-C stops the replicas.
"""
import sys

from tinyllama2.cli import main

if __name__ == "__main__":
  sys.exit(main(["serve", "--ray", *sys.argv[1:]]))
