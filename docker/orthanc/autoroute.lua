-- Auto-routing for the OCT anomaly service: every series that becomes stable (no new instance for StableAge
-- seconds) is sent to the DICOMweb server "oct-service" (orthanc.json → DicomWeb.Servers) by STOW-RS.
--
-- Per series rather than per study: the service stores its results (an SR series and a heatmap series) back into
-- the same study, which would make a study-level trigger fire again; new series never re-trigger an old one.
-- Series the service made itself (Manufacturer "oct-anomaly") and non-image series are never forwarded.

local SERVER = 'oct-service'
local OWN_MANUFACTURER = 'oct-anomaly'
local NOT_IMAGES = { SR = true, PR = true, KO = true, DOC = true, REG = true, RWV = true, PLAN = true }

function OnStableSeries(seriesId, tags, metadata)
  if tags['Manufacturer'] == OWN_MANUFACTURER then
    return
  end
  if NOT_IMAGES[tags['Modality'] or ''] then
    return
  end
  local request = { Resources = { seriesId }, Synchronous = false }
  local answer = ParseJson(RestApiPost('/dicom-web/servers/' .. SERVER .. '/stow', DumpJson(request, true)))
  print('oct-autoroute: series ' .. seriesId .. ' (' .. (tags['Modality'] or '?') .. ') sent to ' .. SERVER ..
        ', job ' .. tostring(answer['ID']))
end
