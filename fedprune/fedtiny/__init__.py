"""FedTiny (Huang et al., ICDCS 2023) building blocks, Flower-free. Work in progress."""
