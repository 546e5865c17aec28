"""Client side of fedimb: the ClientApp, local training, losses and client algorithms."""
