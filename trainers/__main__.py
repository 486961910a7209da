"""`python -m trainers train grpo CONFIG`: the `train` and `sample` commands where a launcher
needs a module, e.g. `torchrun --nproc_per_node 2 -m trainers train grpo CONFIG` or
`accelerate launch -m trainers train sft CONFIG`."""

import click

from .cli import sample, train

main = click.Group("trainers", commands=[train, sample],
                   help="The bundled trainers (the same commands as `mergekit-rl train|sample`).")

if __name__ == "__main__":
    main(prog_name="python -m trainers")
