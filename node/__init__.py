"""Fine-tuning core shared by the daemon and the simulator: models, data, topologies, algorithms."""
