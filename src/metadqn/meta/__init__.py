"""Meta-learners: context encoders, hypernetwork, Siamese index, Reptile, multitask baseline."""
