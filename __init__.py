"""GRU4Rec for PaddlePaddle 3.x, as a PaddleRec model folder: config.yaml, model.py, rsc15_reader.py, data/."""
