"""What every service shares: settings, server bootstrap, health, metrics, batching, errors, vectors."""
