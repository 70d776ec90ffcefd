package ec2fake

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

func post(t *testing.T, srv *httptest.Server, form url.Values, signed bool) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if signed {
		req.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=test")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestFakeRejectsUnsignedAndUnknown(t *testing.T) {
	f := New()
	srv := httptest.NewServer(f)
	defer srv.Close()
	code, body := post(t, srv, url.Values{"Action": {"DescribeInstances"}}, false)
	if code != http.StatusUnauthorized || !strings.Contains(body, "AuthFailure") {
		t.Fatalf("unsigned: %d %s", code, body)
	}
	code, body = post(t, srv, url.Values{"Action": {"RebootInstances"}}, true)
	if code != http.StatusBadRequest || !strings.Contains(body, "<Code>InvalidAction</Code>") {
		t.Fatalf("unknown action: %d %s", code, body)
	}
}

func TestFakeFiltersAndWildcards(t *testing.T) {
	f := New()
	f.AddInstance(Instance{PrivateIP: "10.0.0.1", Tags: map[string]string{"team": "ml-prod"}})
	f.AddInstance(Instance{PrivateIP: "10.0.0.2", Tags: map[string]string{"team": "ml-dev"}})
	f.AddInstance(Instance{PrivateIP: "10.0.0.3", Tags: map[string]string{"team": "web"}})
	srv := httptest.NewServer(f)
	defer srv.Close()
	_, body := post(t, srv, url.Values{"Action": {"DescribeInstances"}, "Filter.1.Name": {"tag:team"}, "Filter.1.Value.1": {"ml-*"}}, true)
	if !strings.Contains(body, "10.0.0.1") || !strings.Contains(body, "10.0.0.2") || strings.Contains(body, "10.0.0.3") {
		t.Fatalf("wildcard filter: %s", body)
	}
	_, body = post(t, srv, url.Values{"Action": {"DescribeInstances"}, "Filter.1.Name": {"tag:team"}, "Filter.1.Value.1": {"web"}, "Filter.1.Value.2": {"ml-dev"}}, true)
	if strings.Contains(body, "10.0.0.1") || !strings.Contains(body, "10.0.0.2") || !strings.Contains(body, "10.0.0.3") {
		t.Fatalf("value list filter: %s", body)
	}
	if n := len(f.Requests("DescribeInstances")); n != 2 {
		t.Fatalf("%d recorded requests", n)
	}
}

func TestFakeMaintainFleetReplacesTerminated(t *testing.T) {
	f := New()
	srv := httptest.NewServer(f)
	defer srv.Close()
	code, body := post(t, srv, url.Values{"Action": {"CreateFleet"}, "Type": {"maintain"},
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId": {"lt-1"},
		"TargetCapacitySpecification.TotalTargetCapacity":                      {"2"}}, true)
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	id := body[strings.Index(body, "<fleetId>")+9 : strings.Index(body, "</fleetId>")]
	fl, ok := f.Fleet(id)
	if !ok || len(fl.Instances) != 2 {
		t.Fatalf("fleet %+v", fl)
	}
	// Terminating an instance of a maintain fleet at its target: replaced.
	post(t, srv, url.Values{"Action": {"TerminateInstances"}, "InstanceId.1": {fl.Instances[0]}}, true)
	fl2, _ := f.Fleet(id)
	if len(fl2.Instances) != 2 || fl2.Instances[0] == fl.Instances[0] {
		t.Fatalf("not replaced: %+v", fl2)
	}
}
