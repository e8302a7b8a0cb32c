"""Networks and RLlib pieces: the triplet embedding network, DARP's modules, learners and algorithms."""
