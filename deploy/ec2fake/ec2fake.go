// Package ec2fake is an in-process EC2 API for tests: an http.Handler that
// speaks the EC2 Query protocol (form-encoded Action=..., XML answers) for
// the calls gpumesh makes — DescribeInstances (paginated), CreateLaunchTemplate,
// CreateFleet, DescribeFleets, DescribeFleetInstances (paginated),
// ModifyFleet and TerminateInstances — over a small simulated world of
// instances and maintain fleets. Point an SDK client at it with
// deploy.AWSConfig{Endpoint: srv.URL} and static credentials.
//
// Fleets are fulfilled at once: CreateFleet and ModifyFleet launch running
// instances (tagged from the launch template's instance tags) up to the
// target; lowering the target terminates nothing (gpumesh always asks for
// no-termination) and TerminateInstances removes instances from their fleet.
// Every request is recorded for assertions.
package ec2fake

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Instance is one simulated instance.
type Instance struct {
	ID, Type, PrivateIP, AZ, SubnetID string
	State                             string // "running", "terminated", ...
	Lifecycle                         string // "spot" or "" (on-demand)
	Tags                              map[string]string
	FleetID                           string
}

// Fleet is one simulated EC2 Fleet.
type Fleet struct {
	ID, Type, State       string
	Total, OnDemand, Spot int
	DefaultType           string
	ExcessPolicy          string
	Tags                  map[string]string
	TemplateID            string
	Overrides             []Override
	Instances             []string // active instance IDs
}

// Override is one (instance type, subnet) pair of a fleet.
type Override struct{ InstanceType, SubnetID string }

// Request is one recorded API call.
type Request struct {
	Action string
	Form   url.Values
}

// Server is the fake. The zero value is not usable; call New.
type Server struct {
	mu        sync.Mutex
	instances []*Instance
	fleets    map[string]*Fleet
	templates map[string]map[string]string // template ID → instance tags
	tplNames  map[string]string            // template name → ID
	requests  []Request
	failNext  map[string][2]string // action → {code, message}
	seq       int
	// PageSize caps results per page when the request gives no MaxResults.
	PageSize int
}

// New returns an empty world.
func New() *Server {
	return &Server{fleets: map[string]*Fleet{}, templates: map[string]map[string]string{}, tplNames: map[string]string{}, failNext: map[string][2]string{}, PageSize: 1000}
}

// AddInstance adds an instance (ID and private IP are generated if empty;
// State defaults to running) and returns its ID.
func (s *Server) AddInstance(in Instance) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addLocked(in).ID
}

func (s *Server) addLocked(in Instance) *Instance {
	s.seq++
	if in.ID == "" {
		in.ID = fmt.Sprintf("i-%017x", s.seq)
	}
	if in.PrivateIP == "" {
		in.PrivateIP = fmt.Sprintf("10.0.%d.%d", s.seq/250, s.seq%250+1)
	}
	if in.State == "" {
		in.State = "running"
	}
	if in.Type == "" {
		in.Type = "m5.large"
	}
	if in.AZ == "" {
		in.AZ = "us-east-1a"
	}
	if in.Tags == nil {
		in.Tags = map[string]string{}
	}
	p := &in
	s.instances = append(s.instances, p)
	return p
}

// FailNext makes the next call of action fail with an EC2 error.
func (s *Server) FailNext(action, code, message string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failNext[action] = [2]string{code, message}
}

// Requests returns the recorded calls of action ("" for all).
func (s *Server) Requests(action string) []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Request
	for _, r := range s.requests {
		if action == "" || r.Action == action {
			out = append(out, r)
		}
	}
	return out
}

// Fleet returns a copy of a fleet.
func (s *Server) Fleet(id string) (Fleet, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.fleets[id]
	if !ok {
		return Fleet{}, false
	}
	c := *f
	c.Instances = append([]string(nil), f.Instances...)
	return c, true
}

// Instance returns a copy of an instance.
func (s *Server) Instance(id string) (Instance, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, in := range s.instances {
		if in.ID == id {
			return *in, true
		}
	}
	return Instance{}, false
}

// ServeHTTP implements the EC2 Query protocol.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeError(w, http.StatusBadRequest, "MalformedQueryString", err.Error())
		return
	}
	if !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 ") {
		writeError(w, http.StatusUnauthorized, "AuthFailure", "request is not signed with SigV4")
		return
	}
	action := r.Form.Get("Action")
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, Request{Action: action, Form: r.Form})
	if f, ok := s.failNext[action]; ok {
		delete(s.failNext, action)
		writeError(w, http.StatusBadRequest, f[0], f[1])
		return
	}
	var body any
	var err *apiError
	switch action {
	case "DescribeInstances":
		body, err = s.describeInstances(r.Form)
	case "CreateLaunchTemplate":
		body, err = s.createLaunchTemplate(r.Form)
	case "CreateFleet":
		body, err = s.createFleet(r.Form)
	case "DescribeFleets":
		body, err = s.describeFleets(r.Form)
	case "DescribeFleetInstances":
		body, err = s.describeFleetInstances(r.Form)
	case "ModifyFleet":
		body, err = s.modifyFleet(r.Form)
	case "TerminateInstances":
		body, err = s.terminateInstances(r.Form)
	default:
		err = &apiError{"InvalidAction", "ec2fake does not implement " + action}
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, err.code, err.msg)
		return
	}
	writeXML(w, http.StatusOK, body)
}

// writeXML sends a complete, length-delimited XML document, as EC2 does.
func writeXML(w http.ResponseWriter, status int, body any) {
	var b bytes.Buffer
	b.WriteString(xml.Header)
	if err := xml.NewEncoder(&b).Encode(body); err != nil {
		http.Error(w, "ec2fake: encoding the answer: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml;charset=UTF-8")
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(status)
	w.Write(b.Bytes()) // a failed write means the client went away
}

type apiError struct{ code, msg string }

func writeError(w http.ResponseWriter, status int, code, msg string) {
	type e struct {
		Code    string `xml:"Code"`
		Message string `xml:"Message"`
	}
	type resp struct {
		XMLName   xml.Name `xml:"Response"`
		Errors    []e      `xml:"Errors>Error"`
		RequestID string   `xml:"RequestID"`
	}
	writeXML(w, status, resp{Errors: []e{{code, msg}}, RequestID: "req-fake"})
}

// list returns the values of a query list "Prefix.N" (or "Prefix.N.Suffix"), in order.
func list(form url.Values, prefix, suffix string) []string {
	var out []string
	for i := 1; ; i++ {
		k := prefix + "." + strconv.Itoa(i)
		if suffix != "" {
			k += "." + suffix
		}
		v, ok := form[k]
		if !ok {
			return out
		}
		out = append(out, v[0])
	}
}

// tags reads "Prefix.N.Tag.M.Key/Value" for the tag spec with the given resource type.
func tagsFor(form url.Values, prefix, resourceType string) map[string]string {
	out := map[string]string{}
	for i := 1; ; i++ {
		p := fmt.Sprintf("%s.%d", prefix, i)
		rt, ok := form[p+".ResourceType"]
		if !ok {
			return out
		}
		if rt[0] != resourceType {
			continue
		}
		for j := 1; ; j++ {
			k, ok := form[fmt.Sprintf("%s.Tag.%d.Key", p, j)]
			if !ok {
				break
			}
			out[k[0]] = form.Get(fmt.Sprintf("%s.Tag.%d.Value", p, j))
		}
	}
}

type filter struct {
	name   string
	values []string
}

func filters(form url.Values) []filter {
	var out []filter
	for i := 1; ; i++ {
		n, ok := form[fmt.Sprintf("Filter.%d.Name", i)]
		if !ok {
			return out
		}
		out = append(out, filter{n[0], list(form, fmt.Sprintf("Filter.%d.Value", i), "")})
	}
}

func (in *Instance) matches(f filter) bool {
	var v string
	switch {
	case strings.HasPrefix(f.name, "tag:"):
		tv, ok := in.Tags[strings.TrimPrefix(f.name, "tag:")]
		if !ok {
			return false
		}
		v = tv
	case f.name == "instance-state-name":
		v = in.State
	case f.name == "availability-zone":
		v = in.AZ
	default:
		return false
	}
	for _, want := range f.values {
		if !strings.ContainsAny(want, "*?") {
			if want == v {
				return true
			}
			continue
		}
		// EC2 filter wildcards: * any run, ? one character.
		re := "^" + strings.NewReplacer(`\*`, ".*", `\?`, ".").Replace(regexp.QuoteMeta(want)) + "$"
		if ok, _ := regexp.MatchString(re, v); ok {
			return true
		}
	}
	return false
}

// page applies NextToken/MaxResults to n items.
func (s *Server) page(form url.Values, n int) (start, end int, next string) {
	size := s.PageSize
	if m, err := strconv.Atoi(form.Get("MaxResults")); err == nil && m > 0 {
		size = m
	}
	if t := form.Get("NextToken"); t != "" {
		start, _ = strconv.Atoi(strings.TrimPrefix(t, "tok-"))
	}
	end = start + size
	if end >= n {
		return start, n, ""
	}
	return start, end, fmt.Sprintf("tok-%d", end)
}

type xTag struct {
	Key   string `xml:"key"`
	Value string `xml:"value"`
}

func xTags(m map[string]string) []xTag {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]xTag, 0, len(m))
	for _, k := range keys {
		out = append(out, xTag{k, m[k]})
	}
	return out
}

type xState struct {
	Code int    `xml:"code"`
	Name string `xml:"name"`
}

var stateCodes = map[string]int{"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}

type xInstance struct {
	InstanceID        string `xml:"instanceId"`
	InstanceType      string `xml:"instanceType"`
	PrivateIPAddress  string `xml:"privateIpAddress"`
	SubnetID          string `xml:"subnetId,omitempty"`
	InstanceLifecycle string `xml:"instanceLifecycle,omitempty"`
	Placement         struct {
		AvailabilityZone string `xml:"availabilityZone"`
	} `xml:"placement"`
	State xState `xml:"instanceState"`
	Tags  []xTag `xml:"tagSet>item"`
}

func (s *Server) describeInstances(form url.Values) (any, *apiError) {
	ids := map[string]bool{}
	for _, id := range list(form, "InstanceId", "") {
		ids[id] = true
	}
	fs := filters(form)
	var match []*Instance
	for _, in := range s.instances {
		if len(ids) > 0 && !ids[in.ID] {
			continue
		}
		ok := true
		for _, f := range fs {
			ok = ok && in.matches(f)
		}
		if ok {
			match = append(match, in)
		}
	}
	start, end, next := s.page(form, len(match))
	type reservation struct {
		ReservationID string      `xml:"reservationId"`
		Instances     []xInstance `xml:"instancesSet>item"`
	}
	type resp struct {
		XMLName      xml.Name      `xml:"DescribeInstancesResponse"`
		RequestID    string        `xml:"requestId"`
		Reservations []reservation `xml:"reservationSet>item"`
		NextToken    string        `xml:"nextToken,omitempty"`
	}
	out := resp{RequestID: "req-fake", NextToken: next}
	// One reservation per instance, as EC2 does for separate launches.
	for _, in := range match[start:end] {
		x := xInstance{InstanceID: in.ID, InstanceType: in.Type, PrivateIPAddress: in.PrivateIP, SubnetID: in.SubnetID,
			InstanceLifecycle: in.Lifecycle, State: xState{stateCodes[in.State], in.State}, Tags: xTags(in.Tags)}
		x.Placement.AvailabilityZone = in.AZ
		out.Reservations = append(out.Reservations, reservation{ReservationID: "r-" + in.ID[2:], Instances: []xInstance{x}})
	}
	return out, nil
}

func (s *Server) createLaunchTemplate(form url.Values) (any, *apiError) {
	name := form.Get("LaunchTemplateName")
	if name == "" {
		return nil, &apiError{"MissingParameter", "LaunchTemplateName is required"}
	}
	if _, ok := s.tplNames[name]; ok {
		return nil, &apiError{"InvalidLaunchTemplateName.AlreadyExistsException", "Launch template name already in use."}
	}
	if form.Get("LaunchTemplateData.ImageId") == "" {
		return nil, &apiError{"MissingParameter", "LaunchTemplateData.ImageId is required"}
	}
	s.seq++
	id := fmt.Sprintf("lt-%017x", s.seq)
	s.tplNames[name] = id
	s.templates[id] = tagsFor(form, "LaunchTemplateData.TagSpecification", "instance")
	type lt struct {
		ID      string `xml:"launchTemplateId"`
		Name    string `xml:"launchTemplateName"`
		Latest  int    `xml:"latestVersionNumber"`
		Default int    `xml:"defaultVersionNumber"`
	}
	type resp struct {
		XMLName   xml.Name `xml:"CreateLaunchTemplateResponse"`
		RequestID string   `xml:"requestId"`
		LT        lt       `xml:"launchTemplate"`
	}
	return resp{RequestID: "req-fake", LT: lt{id, name, 1, 1}}, nil
}

func (s *Server) createFleet(form url.Values) (any, *apiError) {
	if form.Get("Type") != "maintain" && form.Get("Type") != "request" && form.Get("Type") != "instant" {
		return nil, &apiError{"InvalidParameterValue", "Type must be instant, request or maintain"}
	}
	lt := "LaunchTemplateConfigs.1.LaunchTemplateSpecification."
	tplID := form.Get(lt + "LaunchTemplateId")
	if n := form.Get(lt + "LaunchTemplateName"); tplID == "" && n != "" {
		tplID = s.tplNames[n]
		if tplID == "" {
			tplID = "lt-external-" + n
		}
	}
	if tplID == "" {
		return nil, &apiError{"MissingParameter", "a launch template is required"}
	}
	total, err := strconv.Atoi(form.Get("TargetCapacitySpecification.TotalTargetCapacity"))
	if err != nil || total < 0 {
		return nil, &apiError{"InvalidParameterValue", "TotalTargetCapacity is required"}
	}
	od, _ := strconv.Atoi(form.Get("TargetCapacitySpecification.OnDemandTargetCapacity"))
	sp, _ := strconv.Atoi(form.Get("TargetCapacitySpecification.SpotTargetCapacity"))
	s.seq++
	f := &Fleet{
		ID: fmt.Sprintf("fleet-%08x-0000-0000-0000-%012x", s.seq, s.seq), Type: form.Get("Type"), State: "active",
		Total: total, OnDemand: od, Spot: sp, DefaultType: form.Get("TargetCapacitySpecification.DefaultTargetCapacityType"),
		ExcessPolicy: form.Get("ExcessCapacityTerminationPolicy"), Tags: tagsFor(form, "TagSpecification", "fleet"),
		TemplateID: tplID,
	}
	for i := 1; ; i++ {
		p := fmt.Sprintf("LaunchTemplateConfigs.1.Overrides.%d.", i)
		it, ok := form[p+"InstanceType"]
		if !ok {
			break
		}
		f.Overrides = append(f.Overrides, Override{it[0], form.Get(p + "SubnetId")})
	}
	s.fleets[f.ID] = f
	s.fulfill(f)
	type resp struct {
		XMLName   xml.Name `xml:"CreateFleetResponse"`
		RequestID string   `xml:"requestId"`
		FleetID   string   `xml:"fleetId"`
	}
	return resp{RequestID: "req-fake", FleetID: f.ID}, nil
}

// fulfill launches instances until the fleet has its target: on-demand
// first up to OnDemand, then the default type; round-robin over overrides.
func (s *Server) fulfill(f *Fleet) {
	for len(f.Instances) < f.Total {
		n := len(f.Instances)
		o := Override{InstanceType: "m5.large"}
		if len(f.Overrides) > 0 {
			o = f.Overrides[n%len(f.Overrides)]
		}
		lc := ""
		if s.countOnDemand(f) >= f.OnDemand && f.DefaultType == "spot" {
			lc = "spot"
		}
		tags := map[string]string{"aws:ec2:fleet-id": f.ID}
		for k, v := range s.templates[f.TemplateID] {
			tags[k] = v
		}
		in := s.addLocked(Instance{Type: o.InstanceType, SubnetID: o.SubnetID, Lifecycle: lc, Tags: tags, FleetID: f.ID})
		f.Instances = append(f.Instances, in.ID)
	}
}

func (s *Server) countOnDemand(f *Fleet) int {
	n := 0
	for _, id := range f.Instances {
		for _, in := range s.instances {
			if in.ID == id && in.Lifecycle == "" {
				n++
			}
		}
	}
	return n
}

func (s *Server) describeFleets(form url.Values) (any, *apiError) {
	ids := list(form, "FleetId", "")
	if len(ids) == 0 {
		for id := range s.fleets {
			ids = append(ids, id)
		}
		sort.Strings(ids)
	}
	type tcs struct {
		Total       int    `xml:"totalTargetCapacity"`
		OnDemand    int    `xml:"onDemandTargetCapacity"`
		Spot        int    `xml:"spotTargetCapacity"`
		DefaultType string `xml:"defaultTargetCapacityType"`
	}
	type fleet struct {
		FleetID           string  `xml:"fleetId"`
		FleetState        string  `xml:"fleetState"`
		ActivityStatus    string  `xml:"activityStatus"`
		Type              string  `xml:"type"`
		Fulfilled         float64 `xml:"fulfilledCapacity"`
		FulfilledOnDemand float64 `xml:"fulfilledOnDemandCapacity"`
		ExcessPolicy      string  `xml:"excessCapacityTerminationPolicy"`
		Target            tcs     `xml:"targetCapacitySpecification"`
		Tags              []xTag  `xml:"tagSet>item"`
	}
	type resp struct {
		XMLName   xml.Name `xml:"DescribeFleetsResponse"`
		RequestID string   `xml:"requestId"`
		Fleets    []fleet  `xml:"fleetSet>item"`
	}
	out := resp{RequestID: "req-fake"}
	for _, id := range ids {
		f, ok := s.fleets[id]
		if !ok {
			continue // EC2 answers an empty set for unknown IDs in some cases
		}
		status := "fulfilled"
		if len(f.Instances) < f.Total {
			status = "pending_fulfillment"
		}
		out.Fleets = append(out.Fleets, fleet{
			FleetID: f.ID, FleetState: f.State, ActivityStatus: status, Type: f.Type,
			Fulfilled: float64(len(f.Instances)), FulfilledOnDemand: float64(s.countOnDemand(f)), ExcessPolicy: f.ExcessPolicy,
			Target: tcs{f.Total, f.OnDemand, f.Spot, f.DefaultType}, Tags: xTags(f.Tags),
		})
	}
	return out, nil
}

func (s *Server) describeFleetInstances(form url.Values) (any, *apiError) {
	f, ok := s.fleets[form.Get("FleetId")]
	if !ok {
		return nil, &apiError{"InvalidFleetId.NotFound", "The fleet ID '" + form.Get("FleetId") + "' does not exist"}
	}
	start, end, next := s.page(form, len(f.Instances))
	type active struct {
		InstanceID            string `xml:"instanceId"`
		InstanceType          string `xml:"instanceType"`
		SpotInstanceRequestID string `xml:"spotInstanceRequestId,omitempty"`
		InstanceHealth        string `xml:"instanceHealth"`
	}
	type resp struct {
		XMLName   xml.Name `xml:"DescribeFleetInstancesResponse"`
		RequestID string   `xml:"requestId"`
		Active    []active `xml:"activeInstanceSet>item"`
		FleetID   string   `xml:"fleetId"`
		NextToken string   `xml:"nextToken,omitempty"`
	}
	out := resp{RequestID: "req-fake", FleetID: f.ID, NextToken: next}
	for _, id := range f.Instances[start:end] {
		for _, in := range s.instances {
			if in.ID == id {
				a := active{InstanceID: in.ID, InstanceType: in.Type, InstanceHealth: "healthy"}
				if in.Lifecycle == "spot" {
					a.SpotInstanceRequestID = "sir-" + in.ID[2:]
				}
				out.Active = append(out.Active, a)
			}
		}
	}
	return out, nil
}

func (s *Server) modifyFleet(form url.Values) (any, *apiError) {
	f, ok := s.fleets[form.Get("FleetId")]
	if !ok {
		return nil, &apiError{"InvalidFleetId.NotFound", "The fleet ID '" + form.Get("FleetId") + "' does not exist"}
	}
	if f.Type != "maintain" {
		return nil, &apiError{"InvalidParameterValue", "only maintain fleets can be modified"}
	}
	total, err := strconv.Atoi(form.Get("TargetCapacitySpecification.TotalTargetCapacity"))
	if err != nil || total < 0 {
		return nil, &apiError{"InvalidParameterValue", "TotalTargetCapacity is required"}
	}
	f.Total = total
	if v := form.Get("TargetCapacitySpecification.OnDemandTargetCapacity"); v != "" {
		f.OnDemand, _ = strconv.Atoi(v)
	}
	if p := form.Get("ExcessCapacityTerminationPolicy"); p != "" {
		f.ExcessPolicy = p
	}
	if f.ExcessPolicy == "termination" {
		for len(f.Instances) > f.Total {
			last := f.Instances[len(f.Instances)-1]
			s.terminateLocked(last)
		}
	}
	s.fulfill(f)
	type resp struct {
		XMLName   xml.Name `xml:"ModifyFleetResponse"`
		RequestID string   `xml:"requestId"`
		Return    bool     `xml:"return"`
	}
	return resp{RequestID: "req-fake", Return: true}, nil
}

func (s *Server) terminateLocked(id string) bool {
	for _, in := range s.instances {
		if in.ID != id {
			continue
		}
		in.State = "terminated"
		if f := s.fleets[in.FleetID]; f != nil {
			for i, fid := range f.Instances {
				if fid == id {
					f.Instances = append(f.Instances[:i], f.Instances[i+1:]...)
					break
				}
			}
			// A maintain fleet replaces what it lost below its target.
			s.fulfill(f)
		}
		return true
	}
	return false
}

func (s *Server) terminateInstances(form url.Values) (any, *apiError) {
	ids := list(form, "InstanceId", "")
	if len(ids) == 0 {
		return nil, &apiError{"MissingParameter", "InstanceId is required"}
	}
	type change struct {
		InstanceID string `xml:"instanceId"`
		Current    xState `xml:"currentState"`
		Previous   xState `xml:"previousState"`
	}
	type resp struct {
		XMLName   xml.Name `xml:"TerminateInstancesResponse"`
		RequestID string   `xml:"requestId"`
		Changes   []change `xml:"instancesSet>item"`
	}
	out := resp{RequestID: "req-fake"}
	for _, id := range ids {
		if !s.terminateLocked(id) {
			return nil, &apiError{"InvalidInstanceID.NotFound", "The instance ID '" + id + "' does not exist"}
		}
		out.Changes = append(out.Changes, change{id, xState{48, "terminated"}, xState{16, "running"}})
	}
	return out, nil
}
