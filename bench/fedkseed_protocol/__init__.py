"""The FedKSeed paper's protocol (Table 2) as one benchmark command."""
