"""Conveyor: the common library shared by the gateway, the workers and the progress service."""
