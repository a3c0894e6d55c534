#!/usr/bin/env bash
# The runs behind the README's "Beyond LeNet" table (2-core CPU, the three runs side by side, one thread each), then
# python examples/beyond_lenet.py. Short runs: these networks are 7 to 100 times LeNet5's MACs on MNIST padded to
# 32x32; a full recipe is a job for a GPU machine (the same commands without --train-limit and with more --epochs).
cd "$(dirname "$0")/.."
mkdir -p runs/beyond
run() {
  name=$1; shift
  python examples/mnist.py --output-dir "runs/beyond/$name" --verbose 2 --threads 1 --deterministic \
    "$@" > "runs/beyond/$name.log" 2>&1
}
run mobilenet_v2 --model mobilenet_v2 --epochs 3 --budget-bops 1.0 &
run resnet20 --model resnet20 --epochs 4 --train-limit 20000 --budget-bops 1.0 &
run vgg7 --model vgg7 --epochs 2 --train-limit 3000 --test-limit 2000 --budget-bops 1.0 &
wait
run resnet20-fixed-mu --model resnet20 --epochs 4 --train-limit 20000 --budget-bops 0 &
wait
python examples/beyond_lenet.py
