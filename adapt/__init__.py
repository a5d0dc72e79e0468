"""Adaptation and transfer: domain adversaries (feature GAN, DANN), domain-gap measures, real-data readers, the
cut-paste real detection set, and the transfer protocols that judge a pretrained backbone on real tasks."""
