"""Phase 1: the triplet embedding network (backbones, photo edge inputs, HED, local descriptors), its losses and its training."""
