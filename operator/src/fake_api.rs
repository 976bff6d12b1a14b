//! A fake Kubernetes API server for unit tests, on a tower-test mock service.
//!
//! Each test decides the answers with a closure and afterwards asserts on the recorded
//! requests, the `ApiServerVerifier` idea of kube-rs' controller-rs without a fixed script.

use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// One request made to the fake.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) method: String,
    /// Path and query.
    pub(crate) path: String,
    /// JSON body, `Null` when empty.
    pub(crate) body: Value,
}

/// Requests recorded so far.
pub(crate) type Calls = Arc<Mutex<Vec<Call>>>;

/// A `metav1.Status` failure body.
pub(crate) fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A client whose requests `respond` answers; every request is recorded in the returned list.
pub(crate) fn client(
    respond: impl Fn(&Call) -> (StatusCode, Value) + Send + 'static,
) -> (Client, Calls) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Calls::default();
    let recorded = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let call = Call { method, path, body };
            let (status, reply) = respond(&call);
            recorded.lock().unwrap().push(call);
            let reply = Body::from(serde_json::to_vec(&reply).unwrap());
            send.send_response(Response::builder().status(status).body(reply).unwrap());
        }
    });
    (Client::new(service, "default"), calls)
}

/// Takes the requests recorded so far.
pub(crate) fn take(calls: &Calls) -> Vec<Call> {
    std::mem::take(&mut *calls.lock().unwrap())
}
