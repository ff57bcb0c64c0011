"""Placeholder load test until the load-test issue lands: single-row iris predictions.

locust -f loadtest/locustfile.py --host http://127.0.0.1:8080
"""

from locust import FastHttpUser, task


class SingleRowPredict(FastHttpUser):
    """One iris row per request through the KServe V1 endpoint."""

    @task
    def predict(self) -> None:
        """POST one row and check the answer."""
        with self.client.post(
            "/v1/models/iris:predict",
            json={"instances": [[5.1, 3.5, 1.4, 0.2]]},
            name="v1 predict iris",
            catch_response=True,
        ) as response:
            if response.status_code != 200 or "predictions" not in (response.json() or {}):
                response.failure(f"status {response.status_code}")
