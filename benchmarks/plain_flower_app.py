"""A plain Flower 1.42 app, written as a user would without fedimb: the overhead and scale benchmarks' yardstick.

    python -m benchmarks.plain_flower_app --data-config experiments/quickstart.yaml --num-clients 10 \\
        --rounds 3 --local-epochs 1 --timings OUT.json [--fraction F] [--num-cpus 1] [--data-override KEY=VALUE ...]

A Message-API ServerApp running Flower's own ``flwr.serverapp.strategy.FedAvg`` with a central
evaluation function, a ClientApp with ``@app.train()`` and ``@app.evaluate()``, started with
``flwr.simulation.run_simulation`` on Ray (Flower's default Ray settings; ``--num-cpus`` per
virtual client). Model, training and test loops are :mod:`benchmarks.plain_torch`'s; the hyper-
parameters travel in the train and evaluate configs, the node's ``partition-id`` names its data.
Each round: ``--fraction`` of the nodes train, ``--fraction-evaluate`` of them score the new
global model on their local test split, then the server scores it on the test set.

Exits 1 when a round got no training reply (a ClientApp that fails becomes an error reply and
Flower's strategy carries on without it).
"""

from __future__ import annotations

import argparse
import sys

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from benchmarks import plain_torch as task

app = ClientApp()


def _data(config: ConfigRecord) -> tuple[str, tuple[str, ...]]:
    return str(config["data-config"]), tuple(str(o) for o in config["data-overrides"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this node's partition; reply its weights and sample count."""
    config = msg.content["config"]
    part = task.partition(*_data(config), int(context.node_config["partition-id"]))
    model = task.Net(tuple(part.x.shape[1:]), int(config["num-classes"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = task.train(model, part.x, part.y, int(config["local-epochs"]), float(config["lr"]),
                      float(config["momentum"]), float(config["weight-decay"]), int(config["batch-size"]))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(part.y)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this node's local test split."""
    config = msg.content["config"]
    part = task.partition(*_data(config), int(context.node_config["partition-id"]))
    model = task.Net(tuple(part.x.shape[1:]), int(config["num-classes"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = task.test(model, part.test_x, part.test_y, int(config["eval-batch-size"]))
    content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": accuracy,
                                                   "num-examples": len(part.test_y)})})
    return Message(content=content, reply_to=msg)


def make_server_app(args: argparse.Namespace, timings: task.Timings, completed: list[int]) -> ServerApp:
    """The ServerApp: FedAvg for ``args.rounds`` rounds, the test set scored before and after each."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        overrides = tuple(args.data_override)
        x_test, y_test, shape, num_classes = task.test_set(args.data_config, overrides)
        torch.manual_seed(args.seed)
        model = task.Net(shape, num_classes)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = task.test(model, x_test, y_test, args.eval_batch_size)
            timings.mark(server_round, accuracy)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        config = ConfigRecord({
            "data-config": args.data_config, "data-overrides": list(overrides), "num-classes": num_classes,
            "local-epochs": args.local_epochs, "lr": args.lr, "momentum": args.momentum,
            "weight-decay": args.weight_decay, "batch-size": args.batch_size, "eval-batch-size": args.eval_batch_size,
        })
        strategy = FedAvg(fraction_train=args.fraction, fraction_evaluate=args.fraction_evaluate)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=args.rounds,
                                train_config=config, evaluate_config=config, evaluate_fn=central)
        completed.append(len(result.train_metrics_clientapp))

    return server


def main(argv: list[str] | None = None) -> int:
    parser = task.task_parser("python -m benchmarks.plain_flower_app", __doc__)
    parser.add_argument("--num-clients", type=int, required=True, help="virtual SuperNodes")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the nodes that train each round")
    parser.add_argument("--fraction-evaluate", type=float, default=1.0,
                        help="share of the nodes that evaluate each round")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per virtual client")
    args = parser.parse_args(argv)
    timings, completed = task.Timings(), []
    run_simulation(server_app=make_server_app(args, timings, completed), client_app=app,
                   num_supernodes=args.num_clients,
                   backend_config={"client_resources": {"num_cpus": args.num_cpus, "num_gpus": 0.0}})
    timings.write(args.timings, rounds_with_replies=completed[0] if completed else 0)
    if not completed or completed[0] < args.rounds:
        print(f"plain Flower app: {completed[0] if completed else 0} of {args.rounds} rounds got training replies",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
