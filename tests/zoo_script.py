"""Every zoo member (tests/model_zoo.py) in one process, run by test_model_zoo.py.

    python tests/zoo_script.py resume ROOT [--text_preset=DIR]
    python tests/zoo_script.py evaluate ROOT [--text_preset=DIR]

`resume`: for each member not yet done (no ROOT/NAME.json), an uninterrupted head + fine-tune
with deterministic=True in ROOT/NAME-whole, then the same in ROOT/NAME, which this process
SIGKILLs itself in (tlloop's fault hook) mid-fine-tune unless ROOT/NAME.killed exists (the
hook creates it as it fires), so the next run of the script resumes it. A member's two digests
go to ROOT/NAME.json; run the script until it ends by itself (members + 1 times).

`evaluate`: on 2 logical CPUs, each member's `tlloop.evaluate` on 1 replica and on a
MirroredStrategy of 2, over 13 examples in batches of 4. Prints one JSON line of both results
by member.
"""

from __future__ import annotations

import argparse
import json
import os

import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("property", choices=("resume", "evaluate"))
parser.add_argument("root")
parser.add_argument("--text_preset", default="")
args = parser.parse_args()
if args.property == "evaluate":  # before TensorFlow initialises its devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import model_zoo as zoo  # noqa: E402

import tlloop  # noqa: E402
from tlloop.supervise import FAULT_ENV  # noqa: E402

KILL_STEP = 8  # of 9: 3 head steps, then 2 fine-tune epochs of 3
members = list(zoo.MEMBERS.values())
if args.text_preset:
    members.append(zoo.text_member(args.text_preset))


def resume(member: zoo.Member) -> None:
    done = os.path.join(args.root, f"{member.name}.json")
    if os.path.exists(done):
        return
    train, evaluation = member.data(24, 1), member.data(8, 2)

    def fit(workdir: str, every_steps: int = 0) -> str:
        # The killed run checkpoints every step, so it resumes mid-epoch.
        checkpoint = tlloop.CheckpointConfig(every_steps=every_steps)
        trainer = zoo.zoo_trainer(
            workdir, member, finetune_epochs=2, deterministic=True, checkpoint=checkpoint
        )
        results = trainer.fit(member.build(), train, evaluation, batch_size=8, export=False)
        assert results.phases[-1]["last_step"] == 9
        return results.weights_sha256

    os.environ.pop(FAULT_ENV, None)
    whole_digest = os.path.join(args.root, f"{member.name}-whole.txt")
    if not os.path.exists(whole_digest):
        whole = fit(os.path.join(args.root, f"{member.name}-whole"))
        with open(whole_digest, "w") as file:
            file.write(whole)
    with open(whole_digest) as file:
        whole = file.read()
    killed = os.path.join(args.root, f"{member.name}.killed")
    os.environ[FAULT_ENV] = f"SIGKILL@{KILL_STEP}:once={killed}"
    resumed = fit(os.path.join(args.root, member.name), every_steps=1)
    with open(done, "w") as file:
        json.dump({"whole": whole, "resumed": resumed, "killed": os.path.exists(killed)}, file)


def evaluate() -> dict:
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    for member in members:
        data = member.data(13, 3)
        one = tlloop.evaluate(member.build(), data, batch_size=4)
        with two.scope():
            model = member.build()
        results[member.name] = [one, tlloop.evaluate(model, data, batch_size=4, strategy=two)]
    return results


if args.property == "resume":
    os.makedirs(args.root, exist_ok=True)
    for member in members:
        resume(member)
else:
    print(json.dumps(evaluate(), default=float))
