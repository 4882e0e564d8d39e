"""What-if: forecasts of an event's next hours and paired-seed intervention effects, with bands (built on simulation)."""
