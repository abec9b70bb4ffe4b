use super::*;

fn of(path: &str, content_type: &str) -> Operation {
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    operation(path, &headers)
}

#[test]
fn only_served_operations_name_their_method_or_route() {
    assert_eq!(
        of(
            "/ivschat.v1.TokenService/CreateChatToken",
            "application/grpc"
        ),
        Operation::Grpc {
            method: "ivschat.v1.TokenService/CreateChatToken"
        }
    );
    assert_eq!(
        of("/DisconnectUser", "application/json"),
        Operation::Http {
            route: Some("/DisconnectUser")
        }
    );
    // Made-up paths, which a caller can send without end, all fall under one value.
    assert_eq!(
        of(
            "/ivschat.v1.TokenService/Made-up-1",
            "application/grpc+proto"
        ),
        Operation::Grpc { method: OTHER }
    );
    assert_eq!(
        of("/made-up-2", "application/json"),
        Operation::Http { route: None }
    );
    assert_eq!(of("/a/b", "text/plain"), Operation::Http { route: None });
}

#[test]
fn every_action_is_served_at_its_grpc_method_and_the_ivs_ones_at_their_route() {
    let grpc = http::HeaderMap::new();
    for action in Action::ALL {
        let method = format!("{}/{action}", grpc_service(action));
        assert_eq!(
            operation(&format!("/{method}"), &grpc),
            Operation::Grpc {
                method: leak(method.clone())
            },
            "{action}"
        );
        let route = format!("/{action}");
        assert_eq!(
            operation(&route, &grpc),
            Operation::Http {
                route: action.in_ivs_api().then(|| leak(route.clone()))
            },
            "{action}"
        );
    }
}

#[test]
fn status_codes_have_their_names_and_only_server_faults_are_errors() {
    let names: Vec<_> = (0..=16).map(grpc_code_name).collect();
    assert_eq!(names[0], "OK");
    assert_eq!(names[7], "PERMISSION_DENIED");
    assert_eq!(names[16], "UNAUTHENTICATED");
    assert_eq!(grpc_code_name(17), "UNKNOWN");
    assert_eq!(grpc_code_name(-1), "UNKNOWN");
    let errors: Vec<_> = names
        .into_iter()
        .filter(|name| is_server_error(name))
        .collect();
    assert_eq!(
        errors,
        [
            "UNKNOWN",
            "DEADLINE_EXCEEDED",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS"
        ]
    );
}

#[test]
fn http_methods_outside_the_known_ones_are_other_and_originals_are_bounded() {
    assert_eq!(known_method(&http::Method::POST), "POST");
    assert_eq!(known_method(&"QUERY".parse().unwrap()), "QUERY");
    assert_eq!(known_method(&"MADEUP".parse().unwrap()), OTHER);
    let long = "é".repeat(MAX_ORIGINAL_BYTES);
    assert!(bounded(&long).len() <= MAX_ORIGINAL_BYTES);
    assert_eq!(bounded("/short"), "/short");
}
